"""Reading a libvirt domain XML that someone else wrote, safely, into a DOM that keeps it as
written (namespace prefixes, attribute order, comments), so the keeper can add what it needs
and leave the rest to its author; and the small edits it makes there.

A VM manager (virt-install, Nova, oVirt, automation) hands its domain XML to policy over the
bus; the CLI checks a file the same way before it sends anything. Such input is bounded in
size and depth, and may hold no DOCTYPE and no entity declaration: the standard library's
DOM does not fetch external entities, but it would expand internal ones (the "billion
laughs"), and a libvirt domain never needs either.
"""

from __future__ import annotations

import xml.parsers.expat
from typing import NoReturn, cast
from xml.dom import minidom

MAX_DOMAIN_XML_CHARS = 128 * 1024
"""The largest domain XML accepted from a VM manager. Real domains are a few KiB (virsh
dumpxml of a VM with a dozen disks and interfaces is under 20 KiB); what the keeper adds
keeps it well inside the 256 KiB a ``vm.start`` carries."""

MAX_START_XML_CHARS = 2 * MAX_DOMAIN_XML_CHARS
"""The largest domain XML a ``vm.start`` carries to a host: a manager's domain with what the
keeper added (its TPM, NVRAM, epoch and secret elements), or policy's template."""

MAX_DEPTH = 32
"""The deepest element nesting accepted (a domain's is about 6): far deeper input is an
attack on the recursive serialiser, not a domain."""

DOMAIN = "domain"


class DomainDocumentError(ValueError):
    """The text is not a domain XML the keeper accepts; the message says why."""


def read_domain_element(text: str, *, max_chars: int = MAX_DOMAIN_XML_CHARS) -> minidom.Element:
    """The `<domain>` element of ``text`` as a DOM, after checking the text is at most
    ``max_chars`` long, well formed, free of DOCTYPE and entities, and rooted at `<domain>`.
    Raises DomainDocumentError otherwise."""
    if len(text) > max_chars:
        raise DomainDocumentError(
            f"the domain XML has {len(text):,} characters, more than the {max_chars:,} accepted"
        )
    _check_structure(text)
    # Checked above: no DOCTYPE, so no entity can be declared, expanded or fetched.
    root = minidom.parseString(text).documentElement  # noqa: S318
    if root is None:  # a well-formed document has its root: checked above
        raise DomainDocumentError("the domain XML has no root element")
    return root


def _check_structure(text: str) -> None:
    """One streaming pass that refuses before any tree is built."""
    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    depth = 0
    roots: list[str] = []

    def refuse_doctype(*_: object) -> NoReturn:
        raise DomainDocumentError("the domain XML has a DOCTYPE, which a domain never needs")

    def refuse_entity(*_: object) -> NoReturn:
        raise DomainDocumentError("the domain XML declares an entity, which a domain never needs")

    def start(name: str, _attributes: object) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise DomainDocumentError(f"the domain XML nests elements deeper than {MAX_DEPTH}")
        if depth == 1:
            roots.append(name)

    def end(_name: str) -> None:
        nonlocal depth
        depth -= 1

    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_entity
    parser.UnparsedEntityDeclHandler = refuse_entity
    parser.ExternalEntityRefHandler = refuse_entity
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(text, True)
    except xml.parsers.expat.ExpatError as error:
        raise DomainDocumentError(
            f"the domain XML is not well-formed XML: {xml.parsers.expat.ErrorString(error.code)} "
            f"at line {error.lineno}, column {error.offset}"
        ) from None
    if roots != [DOMAIN]:
        # expat names a namespaced element "<uri> <local name>".
        namespace, _, local = roots[0].rpartition(" ")
        found = f"<{local} xmlns='{namespace}'>" if namespace else f"<{local}>"
        raise DomainDocumentError(
            f"the domain XML's root element is {found}, not libvirt's <{DOMAIN}>"
        )


# --- edits that keep the rest as written --------------------------------------------------

Sibling = minidom.Element | minidom.Text | minidom.Comment | minidom.ProcessingInstruction | None
"""What may follow an element inside another (the DOM's types allow more)."""

IDENTITY_ELEMENTS = ("name", "uuid", "genid", "title", "description")
"""What libvirt writes first in a domain; `<metadata>` follows them."""


def element_children(parent: minidom.Element) -> list[minidom.Element]:
    """Every child element, in order, whatever its namespace."""
    return [node for node in parent.childNodes if isinstance(node, minidom.Element)]


def children(parent: minidom.Element, tag: str) -> list[minidom.Element]:
    """libvirt's own child elements named ``tag`` (not a namespaced element of that name)."""
    return [
        node
        for node in element_children(parent)
        if node.namespaceURI is None and node.localName == tag
    ]


def text_of(element: minidom.Element) -> str:
    """The element's text, stripped."""
    return "".join(
        node.data for node in element.childNodes if isinstance(node, minidom.Text)
    ).strip()


def set_text(element: minidom.Element, text: str) -> None:
    """Replace the element's text (its child elements stay)."""
    for node in list(element.childNodes):
        if isinstance(node, minidom.Text):
            element.removeChild(node)
    if text:
        element.appendChild(document_of(element).createTextNode(text))


def document_of(element: minidom.Element) -> minidom.Document:
    """The document ``element`` belongs to."""
    document = element.ownerDocument
    if document is None:
        raise ValueError(f"<{element.tagName}> belongs to no document")
    return document


def new_element(parent: minidom.Element, tag: str, **attributes: str) -> minidom.Element:
    """A namespace-less element with ``attributes``, not inserted yet."""
    element = document_of(parent).createElement(tag)
    for name, value in attributes.items():
        element.setAttribute(name, value)
    return element


def insert_after_identity(root: minidom.Element, element: minidom.Element) -> None:
    """Insert ``element`` after the domain's name, UUID, title and description, where
    libvirt puts `<uuid>` and `<metadata>`."""
    anchor: minidom.Element | None = None
    for child in element_children(root):
        if child.namespaceURI is None and child.localName in IDENTITY_ELEMENTS:
            anchor = child
    if anchor is None:
        root.insertBefore(element, root.firstChild)
    else:
        root.insertBefore(element, cast(Sibling, anchor.nextSibling))


def insert_after(parent: minidom.Element, element: minidom.Element, tag: str) -> None:
    """Insert ``element`` after ``parent``'s first ``tag`` child, else at its end."""
    found = children(parent, tag)
    if found:
        parent.insertBefore(element, cast(Sibling, found[0].nextSibling))
    else:
        parent.appendChild(element)
