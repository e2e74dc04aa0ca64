"""The canonical TPM archive: packing, reading a live directory, and refusing hostile input.

The corpus below holds archives crafted to do harm if unpacked naively (path traversal,
links, devices, extension headers that rename members, size bombs, truncation). Each must be
refused, and the last tests push every one of them through the whole receiving path
(bounded decompression, unpacking, writing into place) and show that nothing on disk moved.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keeper_devtools.swtpm_lab import permall_framing
from keeper_host_agent.files.state_writer import write_tpm_state
from keeper_shared.state_format.compression import (
    BlobFormatError,
    DecompressionBombError,
    compress,
    decompress_bounded,
)
from keeper_shared.state_format.tpm_archive import (
    ALLOWED_TPM_FILE_NAMES,
    DEFAULT_LIMITS,
    MAIN_STATE_FILE_NAME,
    ArchiveLimits,
    UnsafeArchiveError,
    UnsafeStateDirError,
    pack_tpm_state,
    read_tpm_state_dir,
    safe_name_repr,
    unpack_tpm_state,
)

CANARY = b"CANARY-TPM-SECRET-5d1c"
PERMALL = "tpm2-00.permall"
VOLATILE = "tpm2-00.volatilestate"
SAVESTATE = "tpm2-00.savestate"
SECRET = CANARY * 40
VM_ID = "6f1d2c3b-9a8e-4f7d-b6c5-a4b3c2d1e0f9"


# ---------------------------------------------------------------- the crafted-archive builder


@dataclass(frozen=True)
class Crafted:
    """One hostile input: raw archive bytes, or an already compressed wire blob."""

    name: str
    data: bytes = field(repr=False)
    limits: ArchiveLimits = DEFAULT_LIMITS
    compressed: bool = False


def _info(
    name: str,
    size: int = 0,
    *,
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o600,
    linkname: str = "",
    pax: Mapping[str, str] | None = None,
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    if pax is not None:
        info.pax_headers = dict(pax)
    return info


def _tar(
    members: Iterable[tuple[tarfile.TarInfo, bytes | None]],
    fmt: int = tarfile.USTAR_FORMAT,
) -> bytes:
    """Build an archive with tarfile itself, as an attacker with a stock library would."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:", format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(
    name: str,
    data: bytes = SECRET,
    *,
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o600,
    pax: Mapping[str, str] | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, len(data), kind=kind, mode=mode, pax=pax), data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    return _info(name, 0, kind=kind, linkname=linkname), None


def _with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _patched(header: bytes, offset: int, value: bytes) -> bytes:
    """A header with ``value`` written at ``offset`` and a checksum that still matches."""
    patched = bytearray(header)
    patched[offset : offset + len(value)] = value
    return _with_checksum(patched)


def _raw(*blocks: bytes) -> bytes:
    return b"".join(blocks) + bytes(2 * tarfile.BLOCKSIZE)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _zlib_bomb(mebibytes: int) -> bytes:
    compressor = zlib.compressobj(9)
    chunk = bytes(1024 * 1024)
    return b"".join([compressor.compress(chunk) for _ in range(mebibytes)]) + compressor.flush()


def _permall_header(size: int = len(SECRET)) -> bytes:
    return _info(PERMALL, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _valid_archive() -> bytes:
    return pack_tpm_state({PERMALL: SECRET, VOLATILE: CANARY})


def _crafted_corpus() -> list[Crafted]:
    small = ArchiveLimits(max_member_size=1000, max_total_size=1500, max_members=8)
    valid = _valid_archive()
    # The first member (permall) ends inside its last block; the rest of it is padding.
    padding_at = tarfile.BLOCKSIZE + len(SECRET)
    first_member_end = 3 * tarfile.BLOCKSIZE
    end_marker_at = 5 * tarfile.BLOCKSIZE
    long_traversal = "a/" * 60 + "../" * 70 + "etc/passwd"
    gnu_longname_header = _info("././@LongLink", 20, kind=tarfile.GNUTYPE_LONGNAME).tobuf(
        tarfile.GNU_FORMAT, "utf-8", "strict"
    )
    return [
        Crafted("dot-dot name", _tar([_file("../x")])),
        Crafted("traversal below tpm2", _tar([_file("tpm2/../../etc/passwd")])),
        Crafted("absolute path", _tar([_file("/etc/passwd")])),
        Crafted("dot-slash allowed name", _tar([_file("./" + PERMALL)])),
        Crafted("allowed name in a subdirectory", _tar([_file("tpm2/" + PERMALL)])),
        Crafted("symlink member", _tar([_special(PERMALL, tarfile.SYMTYPE, "/etc/shadow")])),
        Crafted("hardlink member", _tar([_special(PERMALL, tarfile.LNKTYPE, "/etc/shadow")])),
        Crafted(
            "symlink to a symlink",
            _tar(
                [
                    _special(SAVESTATE, tarfile.SYMTYPE, "/etc"),
                    _special(PERMALL, tarfile.SYMTYPE, SAVESTATE + "/passwd"),
                ]
            ),
        ),
        Crafted(
            "hardlink to a symlink",
            _tar(
                [
                    _special(SAVESTATE, tarfile.SYMTYPE, "/etc/passwd"),
                    _special(PERMALL, tarfile.LNKTYPE, SAVESTATE),
                ]
            ),
        ),
        Crafted(
            "symlink then a file through it",
            _tar([_special(VOLATILE, tarfile.SYMTYPE, "/etc"), _file(VOLATILE + "/cron.d/x")]),
        ),
        Crafted("character device", _tar([_special(PERMALL, tarfile.CHRTYPE)])),
        Crafted("block device", _tar([_special(PERMALL, tarfile.BLKTYPE)])),
        Crafted("fifo", _tar([_special(PERMALL, tarfile.FIFOTYPE)])),
        Crafted("directory member", _tar([_special(PERMALL, tarfile.DIRTYPE)])),
        Crafted("contiguous file", _tar([_file(PERMALL, kind=tarfile.CONTTYPE)])),
        Crafted("set-uid file", _tar([_file(PERMALL, mode=0o4755)])),
        Crafted("set-gid file", _tar([_file(PERMALL, mode=0o2755)])),
        Crafted("sticky file", _tar([_file(PERMALL, mode=0o1600)])),
        Crafted("huge declared member", _raw(_permall_header(2 * 1024**3))),
        Crafted(
            "member over the size limit",
            _tar([_file(PERMALL, SECRET * 40)]),
            limits=ArchiveLimits(max_member_size=len(SECRET)),
        ),
        Crafted(
            "too many members",
            _tar([_file(PERMALL), _file(SAVESTATE), _file(VOLATILE)]),
            limits=ArchiveLimits(max_members=2),
        ),
        Crafted(
            "total too big",
            _tar([_file(PERMALL, CANARY * 40), _file(VOLATILE, CANARY * 40)]),
            limits=small,
        ),
        Crafted("duplicate names", _tar([_file(PERMALL), _file(PERMALL, CANARY)])),
        Crafted("backup name", _tar([_file(PERMALL), _file("tpm2-00.permall.bak")])),
        Crafted("lock file", _tar([_file(PERMALL), _file(".lock")])),
        Crafted("upper-case name", _tar([_file("TPM2-00.PERMALL")])),
        Crafted("swtpm temp name", _tar([_file("TMP2-00.permall")])),
        Crafted("empty name", _raw(_patched(_permall_header(0), 0, bytes(100)))),
        Crafted("name with a newline", _tar([_file(PERMALL + "\n")])),
        Crafted("no permall", _tar([_file(VOLATILE)])),
        Crafted("no members at all", bytes(tarfile.RECORDSIZE)),
        Crafted("zlib bomb as the outer compression", _zlib_bomb(64), compressed=True),
        Crafted("zstd bomb as the outer compression", compress(bytes(64 << 20)), compressed=True),
        Crafted("corrupt outer compression", compress(valid)[:-9], compressed=True),
        Crafted("gzip-compressed tar", gzip.compress(valid, mtime=0)),
        Crafted("truncated inside a member", valid[: tarfile.BLOCKSIZE + 100]),
        Crafted("truncated after a member", valid[:first_member_end]),
        Crafted("truncated end marker", valid[: end_marker_at + 700]),
        Crafted("truncated header", valid[:300]),
        Crafted("empty bytes", b""),
        Crafted("not an archive", b"This is not a tar archive. " * 40),
        Crafted("random bytes", hashlib.sha512(CANARY).digest() * 20),
        Crafted("data after the end marker", valid + _pad(CANARY)),
        Crafted(
            "garbage in the padding",
            valid[:padding_at] + CANARY + valid[padding_at + len(CANARY) :],
        ),
        Crafted(
            "corrupt second header",
            valid[:1536] + bytes([valid[1536] ^ 0xFF]) + valid[1537:],
        ),
        Crafted(
            "understated size",
            _raw(_permall_header(len(SECRET) - 600) + _pad(SECRET)),
        ),
        Crafted(
            "negative base-256 size",
            _raw(_patched(_permall_header(), 124, b"\xff" * 12), _pad(SECRET)),
        ),
        Crafted(
            "ustar prefix traversal",
            _raw(_patched(_permall_header(), 345, b"../../../etc\0"), _pad(SECRET)),
        ),
        Crafted(
            "regular file with a link target",
            _raw(_patched(_permall_header(), 157, b"/etc/shadow\0"), _pad(SECRET)),
        ),
        Crafted(
            "v7 header without ustar magic",
            _raw(_patched(_permall_header(), 257, bytes(8)), _pad(SECRET)),
        ),
        Crafted(
            "GNU long name to a traversal", _tar([_file(long_traversal)], fmt=tarfile.GNU_FORMAT)
        ),
        Crafted(
            "GNU long name renaming an allowed member",
            _raw(
                gnu_longname_header,
                _pad(b"../../../etc/passwd\0"),
                _info(PERMALL, len(SECRET)).tobuf(tarfile.GNU_FORMAT, "utf-8", "strict"),
                _pad(SECRET),
            ),
        ),
        Crafted("GNU format member", _tar([_file(PERMALL)], fmt=tarfile.GNU_FORMAT)),
        Crafted(
            "GNU sparse member",
            _raw(
                _info(PERMALL, 0, kind=tarfile.GNUTYPE_SPARSE).tobuf(
                    tarfile.GNU_FORMAT, "utf-8", "strict"
                )
            ),
        ),
        Crafted(
            "pax path override",
            _tar([_file(PERMALL, pax={"path": "../../x"})], fmt=tarfile.PAX_FORMAT),
        ),
        Crafted(
            "pax size override",
            _tar([_file(PERMALL, pax={"size": "99999999999"})], fmt=tarfile.PAX_FORMAT),
        ),
        Crafted(
            "pax linkpath on a symlink",
            _tar(
                [(_info(PERMALL, kind=tarfile.SYMTYPE, pax={"linkpath": "/etc/shadow"}), None)],
                fmt=tarfile.PAX_FORMAT,
            ),
        ),
        Crafted(
            "pax global header",
            _raw(
                _info("pax_global_header", 0, kind=tarfile.XGLTYPE).tobuf(
                    tarfile.USTAR_FORMAT, "utf-8", "strict"
                ),
                _permall_header(),
                _pad(SECRET),
            ),
        ),
        Crafted(
            "unknown member type",
            _raw(_patched(_permall_header(), 156, b"Z"), _pad(SECRET)),
        ),
    ]


CORPUS = _crafted_corpus()


def _through_the_wire(crafted: Crafted) -> dict[str, bytes]:
    """What a host does with a received blob: inflate (bounded), then unpack."""
    wire = crafted.data if crafted.compressed else compress(crafted.data)
    archive = decompress_bounded(wire, crafted.limits.max_archive_size())
    return unpack_tpm_state(archive, crafted.limits)


def _assert_no_canary(text: str) -> None:
    for form in (CANARY, CANARY.hex().encode(), base64.b64encode(CANARY)):
        assert form.decode() not in text


# ------------------------------------------------------------------------ packing


def test_round_trip() -> None:
    files = {PERMALL: SECRET, VOLATILE: b"", SAVESTATE: os.urandom(5000)}
    assert unpack_tpm_state(pack_tpm_state(files)) == files


def test_packing_is_deterministic() -> None:
    forward = {PERMALL: SECRET, VOLATILE: CANARY, SAVESTATE: b"s"}
    backward = {SAVESTATE: b"s", VOLATILE: CANARY, PERMALL: SECRET}
    assert pack_tpm_state(forward) == pack_tpm_state(backward)
    assert (
        hashlib.sha256(pack_tpm_state(forward)).digest()
        == hashlib.sha256(pack_tpm_state(dict(forward))).digest()
    )


def test_packed_members_carry_fixed_metadata() -> None:
    with tarfile.open(fileobj=io.BytesIO(_valid_archive()), mode="r:") as archive:
        members = archive.getmembers()
    assert [member.name for member in members] == sorted([PERMALL, VOLATILE])
    for member in members:
        assert member.isreg()
        assert (member.mode, member.uid, member.gid, member.mtime) == (0o600, 0, 0, 0)
        assert (member.uname, member.gname) == ("", "")


def test_different_content_gives_different_bytes() -> None:
    assert pack_tpm_state({PERMALL: b"a"}) != pack_tpm_state({PERMALL: b"b"})


def test_packed_state_compresses_small() -> None:
    permall = os.urandom(3000) + bytes(3000)
    assert len(compress(pack_tpm_state({PERMALL: permall}))) < 4096


@pytest.mark.parametrize(
    "files",
    [
        {PERMALL: b"x", "../x": b"y"},
        {PERMALL: b"x", ".lock": b""},
        {"TPM2-00.PERMALL": b"x"},
        {VOLATILE: b"x"},
        {},
        {PERMALL: bytes(DEFAULT_LIMITS.max_member_size + 1)},
    ],
    ids=["traversal", "lock", "upper-case", "no-permall", "empty", "too-big"],
)
def test_packing_refuses_what_unpacking_would(files: dict[str, bytes]) -> None:
    with pytest.raises(UnsafeArchiveError):
        pack_tpm_state(files)


def test_packing_refuses_non_bytes() -> None:
    with pytest.raises(UnsafeArchiveError, match="must be bytes"):
        pack_tpm_state({PERMALL: "text"})  # type: ignore[dict-item]


def test_limits_bound_the_archive_for_decompression() -> None:
    files = {name: os.urandom(DEFAULT_LIMITS.max_member_size) for name in ALLOWED_TPM_FILE_NAMES}
    assert len(pack_tpm_state(files)) <= DEFAULT_LIMITS.max_archive_size()


# ------------------------------------------------------------------------ hostile archives


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 20
    assert len({crafted.name for crafted in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("crafted", CORPUS, ids=[crafted.name for crafted in CORPUS])
def test_crafted_archive_is_refused(crafted: Crafted) -> None:
    if crafted.compressed:
        with pytest.raises(BlobFormatError) as caught:
            _through_the_wire(crafted)
    else:
        with pytest.raises(UnsafeArchiveError) as caught:
            unpack_tpm_state(crafted.data, crafted.limits)
    message = str(caught.value)
    _assert_no_canary(message)
    assert len(message) < 400
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


@pytest.mark.parametrize("crafted", CORPUS, ids=[crafted.name for crafted in CORPUS])
def test_crafted_archive_is_refused_off_the_wire(crafted: Crafted) -> None:
    with pytest.raises(BlobFormatError):
        _through_the_wire(crafted)


@pytest.mark.parametrize("name", ["zlib bomb", "zstd bomb"])
def test_the_outer_bomb_is_a_decompression_bomb(name: str) -> None:
    (bomb,) = [crafted for crafted in CORPUS if crafted.name.startswith(name)]
    with pytest.raises(DecompressionBombError):
        _through_the_wire(bomb)


@pytest.mark.parametrize(
    ("name", "naive_name"),
    [
        ("pax path override", "../../x"),
        ("GNU long name renaming an allowed member", "../../../etc/passwd"),
        ("ustar prefix traversal", "../../../etc/" + PERMALL),
    ],
)
def test_the_rename_tricks_would_fool_a_naive_reader(name: str, naive_name: str) -> None:
    # Shows the crafted input is a real attack: stock tarfile reports the traversal name.
    (crafted,) = [c for c in CORPUS if c.name == name]
    with tarfile.open(fileobj=io.BytesIO(crafted.data), mode="r:") as archive:
        assert archive.getnames() == [naive_name]


def test_naive_reader_silently_drops_members_after_a_corrupt_header() -> None:
    # Why unpack_tpm_state walks headers itself instead of trusting TarFile.next().
    (crafted,) = [c for c in CORPUS if c.name == "corrupt second header"]
    with tarfile.open(fileobj=io.BytesIO(crafted.data), mode="r:") as archive:
        assert archive.getnames() == [PERMALL]


def test_messages_name_the_reason_and_member() -> None:
    with pytest.raises(UnsafeArchiveError, match=r"member '\.\./x' is a symbolic link"):
        unpack_tpm_state(_tar([_special("../x", tarfile.SYMTYPE, "/etc")]))
    with pytest.raises(UnsafeArchiveError, match=r"'tpm2-00\.permall\.bak' is not one of"):
        unpack_tpm_state(_tar([_file("tpm2-00.permall.bak")]))
    with pytest.raises(UnsafeArchiveError, match="appears more than once"):
        unpack_tpm_state(_tar([_file(PERMALL), _file(PERMALL)]))
    with pytest.raises(UnsafeArchiveError, match="set-uid, set-gid, sticky"):
        unpack_tpm_state(_tar([_file(PERMALL, mode=0o4600)]))


def test_long_member_names_are_shortened_in_messages() -> None:
    name = "x" * 5000
    with pytest.raises(UnsafeArchiveError) as caught:
        unpack_tpm_state(_tar([_file(name)], fmt=tarfile.PAX_FORMAT))
    assert len(str(caught.value)) < 300


def test_safe_name_repr_escapes_and_shortens() -> None:
    assert safe_name_repr("a\nb") == "'a\\nb'"
    assert len(safe_name_repr("y" * 10_000)) == 100
    assert safe_name_repr("y" * 10_000).endswith("...")
    assert safe_name_repr("short") == "'short'"


def test_oversized_archive_is_refused_before_parsing() -> None:
    limits = ArchiveLimits(max_member_size=10, max_total_size=10, max_members=1)
    with pytest.raises(UnsafeArchiveError, match="more than the"):
        unpack_tpm_state(bytes(limits.max_archive_size() + 1), limits)


def test_unpack_refuses_non_bytes() -> None:
    with pytest.raises(UnsafeArchiveError, match="must be bytes"):
        unpack_tpm_state(bytearray(_valid_archive()))  # type: ignore[arg-type]


def test_archives_from_stock_ustar_writers_are_accepted() -> None:
    # Real ustar archives carry owners, times and record padding; only names/types matter.
    info = _info(PERMALL, len(SECRET))
    info.uid, info.gid, info.uname, info.gname, info.mtime = 107, 113, "swtpm", "swtpm", 1e9
    assert unpack_tpm_state(_tar([(info, SECRET)])) == {PERMALL: SECRET}
    # An archive that ends right after the two zero blocks, with no record padding.
    assert unpack_tpm_state(_raw(_permall_header(), _pad(SECRET))) == {PERMALL: SECRET}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=3 * 512 - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    )
)
def test_mutated_archives_are_refused_or_stay_within_the_rules(
    mutations: list[tuple[int, int]],
) -> None:
    archive = bytearray(_valid_archive())
    for position, value in mutations:
        archive[position] = value
    try:
        files = unpack_tpm_state(bytes(archive))
    except UnsafeArchiveError as exc:
        _assert_no_canary(str(exc))
        return
    assert set(files) <= ALLOWED_TPM_FILE_NAMES
    assert MAIN_STATE_FILE_NAME in files


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    with contextlib.suppress(UnsafeArchiveError):
        unpack_tpm_state(data)


# ------------------------------------------------------------------------ the live directory


def _live_dir(tmp_path: Path) -> Path:
    tpm2 = tmp_path / "swtpm" / VM_ID / "tpm2"
    tpm2.mkdir(parents=True)
    (tpm2 / PERMALL).write_bytes(SECRET)
    (tpm2 / VOLATILE).write_bytes(CANARY)
    (tpm2 / ".lock").write_bytes(b"")
    (tpm2 / "TMP2-00.permall").write_bytes(b"half-written")
    (tpm2 / "notes.txt").write_bytes(b"x")
    return tpm2


def test_read_dir_takes_allowed_files_only(tmp_path: Path) -> None:
    tpm2 = _live_dir(tmp_path)
    assert read_tpm_state_dir(tpm2) == {PERMALL: SECRET, VOLATILE: CANARY}


def test_read_dir_then_pack_then_unpack(tmp_path: Path) -> None:
    files = read_tpm_state_dir(_live_dir(tmp_path))
    assert unpack_tpm_state(pack_tpm_state(files)) == files


def test_read_dir_without_permall_returns_what_is_there(tmp_path: Path) -> None:
    tpm2 = tmp_path / "tpm2"
    tpm2.mkdir()
    (tpm2 / ".lock").write_bytes(b"")
    assert read_tpm_state_dir(tpm2) == {}


def test_read_dir_missing_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_tpm_state_dir(tmp_path / "nope")


def test_read_dir_refuses_a_symlinked_file(tmp_path: Path) -> None:
    tpm2 = _live_dir(tmp_path)
    outside = tmp_path / "shadow"
    outside.write_bytes(b"root:secret")
    (tpm2 / PERMALL).unlink()
    (tpm2 / PERMALL).symlink_to(outside)
    with pytest.raises(UnsafeStateDirError, match="symlink"):
        read_tpm_state_dir(tpm2)


def test_read_dir_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    tpm2 = _live_dir(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(tpm2)
    with pytest.raises(UnsafeStateDirError, match="symlink or not a directory"):
        read_tpm_state_dir(link)


def test_read_dir_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    tpm2 = _live_dir(tmp_path)
    os.mkfifo(tpm2 / SAVESTATE)
    with pytest.raises(UnsafeStateDirError, match="not a regular file"):
        read_tpm_state_dir(tpm2)


def test_read_dir_refuses_a_directory_in_place_of_a_file(tmp_path: Path) -> None:
    tpm2 = _live_dir(tmp_path)
    (tpm2 / SAVESTATE).mkdir()
    with pytest.raises(UnsafeStateDirError, match="not a regular file"):
        read_tpm_state_dir(tpm2)


def test_read_dir_refuses_a_hard_link(tmp_path: Path) -> None:
    tpm2 = _live_dir(tmp_path)
    outside = tmp_path / "host-secret"
    outside.write_bytes(b"root:secret")
    os.link(outside, tpm2 / SAVESTATE)
    with pytest.raises(UnsafeStateDirError, match="hard links"):
        read_tpm_state_dir(tpm2)


def test_read_dir_bounds_sizes(tmp_path: Path) -> None:
    tpm2 = _live_dir(tmp_path)
    with pytest.raises(UnsafeStateDirError, match="more than the 100 allowed"):
        read_tpm_state_dir(tpm2, ArchiveLimits(max_member_size=100))
    limits = ArchiveLimits(max_member_size=len(SECRET), max_total_size=len(SECRET) + 1)
    with pytest.raises(UnsafeStateDirError, match="in total"):
        read_tpm_state_dir(tpm2, limits)


# ------------------------------------------------------------------------ end to end on disk


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every path under ``root`` with its type, mode and content (or link target)."""
    tree: dict[str, tuple[int, bytes | str | None]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            info = path.lstat()
            content: bytes | str | None = None
            if stat.S_ISREG(info.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            tree[str(path.relative_to(root))] = (info.st_mode, content)
    return tree


def test_no_crafted_archive_changes_anything_on_disk(tmp_path: Path) -> None:
    swtpm_root = tmp_path / "var" / "lib" / "libvirt" / "swtpm"
    swtpm_root.mkdir(parents=True)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    old_state = {PERMALL: permall_framing(b"old permall " + CANARY), VOLATILE: b"old volatile"}
    tpm2 = write_tpm_state(swtpm_root, VM_ID, old_state, None)
    before = _snapshot(tmp_path)

    refused = 0
    for crafted in CORPUS:
        try:
            files = _through_the_wire(crafted)
        except BlobFormatError:
            refused += 1
            continue
        write_tpm_state(swtpm_root, VM_ID, files, None)

    assert refused == len(CORPUS)
    assert _snapshot(tmp_path) == before
    assert read_tpm_state_dir(tpm2) == old_state
    # And a valid blob through the same path does land, only inside the VM's directory.
    new_state = {PERMALL: permall_framing(b"new permall")}
    valid = Crafted("valid", pack_tpm_state(new_state))
    write_tpm_state(swtpm_root, VM_ID, _through_the_wire(valid), None)
    after = _snapshot(tmp_path)
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    vm_dir = str((swtpm_root / VM_ID).relative_to(tmp_path))
    assert changed
    assert all(path.startswith(vm_dir + "/") for path in changed)
    assert read_tpm_state_dir(tpm2) == new_state
