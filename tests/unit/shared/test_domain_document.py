"""Reading a domain XML someone else wrote: bounded, no DOCTYPE or entities, a `<domain>`
root, and the document kept as written (prefixes, comments) through the keeper's edits."""

from __future__ import annotations

import pytest

from keeper_shared.domain_document import (
    MAX_DEPTH,
    MAX_DOMAIN_XML_CHARS,
    DomainDocumentError,
    children,
    read_domain_element,
    set_text,
    text_of,
)

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE domain [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<domain type='kvm'><name>&lol3;</name></domain>"""

EXTERNAL_ENTITY = """<!DOCTYPE domain [<!ENTITY passwd SYSTEM "file:///etc/passwd">]>
<domain type='kvm'><name>&passwd;</name></domain>"""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (BILLION_LAUGHS, "DOCTYPE"),
        (EXTERNAL_ENTITY, "DOCTYPE"),
        ("<domain type='kvm'><name>&lol;</name></domain>", "undefined entity"),
        ("<domain type='kvm'><name>x</domain>", "mismatched tag"),
        ("", "not well-formed"),
        ("<network><name>default</name></network>", "root element is <network>"),
        (
            "<domain xmlns='http://example.org/d' type='kvm'/>",
            "root element is <domain xmlns='http://example.org/d'>",
        ),
        ("<domain>" + "<a>" * MAX_DEPTH + "</a>" * MAX_DEPTH + "</domain>", "deeper than"),
        ("<domain>" + " " * MAX_DOMAIN_XML_CHARS + "</domain>", "more than"),
    ],
    ids=[
        "billion-laughs",
        "external-entity",
        "undeclared-entity",
        "mismatched",
        "empty",
        "not-a-domain",
        "namespaced-root",
        "too-deep",
        "too-large",
    ],
)
def test_dangerous_or_unusable_input_is_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(DomainDocumentError, match=reason):
        read_domain_element(text)


def test_a_larger_bound_can_be_asked_for() -> None:
    text = "<domain>" + " " * MAX_DOMAIN_XML_CHARS + "</domain>"

    assert read_domain_element(text, max_chars=2 * MAX_DOMAIN_XML_CHARS).tagName == "domain"


def test_an_edit_keeps_the_rest_as_written() -> None:
    text = (
        "<domain type='kvm'><!-- made by hand --><name>web</name><metadata>"
        "<nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>"
        "<nova:name>web</nova:name></nova:instance></metadata>"
        "<os><nvram template='/t.fd'/></os></domain>"
    )
    root = read_domain_element(text)
    (os,) = children(root, "os")
    (nvram,) = children(os, "nvram")

    set_text(nvram, "/var/lib/libvirt/qemu/nvram/web_VARS.fd")

    written = root.toxml()
    assert "<!-- made by hand -->" in written
    assert "<nova:instance xmlns:nova=" in written
    assert "<nova:name>web</nova:name>" in written
    assert text_of(children(read_domain_element(written), "name")[0]) == "web"
    assert '<nvram template="/t.fd">/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>' in written


def test_a_namespaced_element_is_not_libvirts_own() -> None:
    root = read_domain_element(
        "<domain><x:name xmlns:x='urn:x'>not this</x:name><name>this</name></domain>"
    )

    assert [text_of(name) for name in children(root, "name")] == ["this"]
