"""Property-based fuzzing (hypothesis) of every parser of untrusted input.

Fuzzed: the gen_args JSON (``GenArgs.parse``) and the request tensors of a served model
(``serving.handler``), the MME's TargetModel names, request bodies and HTTP front (``mme.loader``,
``mme.front``), tar archives (``safe_tar.safe_extract``), uploaded image bytes
(``preprocess.intake.load_photo``), user and job ids (``names``) and training-job requests
(``jobs.request.parse_request``).

The property, for each: the parser returns a valid value (its bounds hold; it round-trips where
the module offers a way back) or raises its documented error with a message naming the field;
never another exception type, never a hang. deadline=None: the first examples pay for imports;
a hang shows as the file's runtime instead (about 30 s on 2 cores; max_examples set per test, a
tenth of it in `make test-fast`: tests/fixtures/lanes.py).
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import math
import os
import re
import stat
import string
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import pytest
from fixtures.jobs import S3_PREFIX, make_service_config
from fixtures.lanes import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from avatarforge.generate import SCHEDULERS, GenArgs
from avatarforge.jobs.errors import JobRequestError
from avatarforge.jobs.request import (
    FIELDS,
    PREPROCESS_OVERRIDES,
    TRAIN_OVERRIDES,
    JobRequest,
)
from avatarforge.jobs.request import parse_request as parse_job_request
from avatarforge.mme.front import MAX_BODY_BYTES, Invoker, mme_front, read_body
from avatarforge.mme.loader import InvalidTargetModelError, MultiModelLoader, check_target_model
from avatarforge.mme.protocol import TARGET_MODEL_HEADER
from avatarforge.names import (
    RESERVED_PREFIXES,
    RESERVED_USERS,
    InvalidNameError,
    check_job_id,
    check_user_id,
)
from avatarforge.preprocess.intake import FORMATS, Photo, Rejected, load_photo
from avatarforge.safe_tar import (
    MAX_DEPTH,
    MAX_NAME_BYTES,
    MAX_PART_BYTES,
    UnsafeArchiveError,
    safe_extract,
)
from avatarforge.serving import schema
from avatarforge.serving.handler import (
    MAX_TEXT_CHARS,
    InternalError,
    RequestError,
    handle_requests,
    parse_request,
)
from avatarforge.settings import ConfigError

# ------------------------------------------------------------------------------ shared strategies


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Each strategy as often as its weight (st.one_of draws its branches alike, once each)."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


ALNUM = set(string.ascii_letters + string.digits)
# Integers far past any bound and past float range: int -> float conversions overflow there.
HUGE_INTS = st.integers(min_value=-(10**400), max_value=10**400)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE_INTS,
    st.floats(),  # NaN and +-inf too: json.dumps writes them and json.loads reads them back
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
# Nesting deeper than the interpreter's recursion limit, in a few KB of text.
DEEP_JSON = st.builds(lambda n, c: c * n, st.integers(1, 3000), st.sampled_from(["[", '{"a":']))


def truncations(texts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Prefixes of ``texts``: what a cut connection or a sloppy client sends."""
    return st.builds(lambda t, i: t[: i % (len(t) + 1)], texts, st.integers(0, 10**6))


# ----------------------------------------------------------------------------------- gen_args


def _gen_values(field: dataclasses.Field) -> st.SearchStrategy:
    """Mostly values at and just past the field's bounds (so valid objects are common and each
    bound is tried), else anything."""
    meta = field.metadata
    if meta["choices"]:
        good = st.sampled_from(meta["choices"])
        edge = st.sampled_from([c.upper() for c in meta["choices"]] + [" ddim"])  # near misses
    else:
        edge = st.sampled_from([meta["ge"] - 1, meta["le"] + 1])  # just past a bound
        if field.type == "float":
            good = st.floats(meta["ge"], meta["le"])
        else:
            good = st.integers(int(meta["ge"]), int(meta["le"]))
        if field.name in ("height", "width"):  # mostly multiples of 8, some not
            good = weighted((3, good.map(lambda v: v - v % 8)), (1, good))
    return weighted((10, good), (2, edge), (1, SCALARS), (1, JSON_VALUES))


GEN_FIELDS = {f.name: f for f in dataclasses.fields(GenArgs)}
GEN_KEYS = st.sampled_from(
    [*GEN_FIELDS, *GenArgs.ALIASES, *GenArgs.NOT_HERE, "step", "Seed", "cfg_scal"]
)
GOOD_GEN_DICTS = st.fixed_dictionaries(
    {}, optional={n: _gen_values(f) for n, f in GEN_FIELDS.items()}
)
GEN_DICTS = weighted(
    (2, GOOD_GEN_DICTS),
    (1, st.dictionaries(GEN_KEYS | st.text(max_size=10), JSON_VALUES, max_size=5)),
)
GEN_TEXTS = weighted(
    (6, GEN_DICTS.map(json.dumps)),
    (1, truncations(GEN_DICTS.map(json.dumps))),
    (1, JSON_VALUES.map(json.dumps)),
    (1, DEEP_JSON),
    (1, st.text(max_size=40)),
)


def assert_valid_gen_args(args: GenArgs) -> None:
    for name, f in GEN_FIELDS.items():
        value, meta = getattr(args, name), f.metadata
        if meta["choices"]:
            assert value in meta["choices"]
            continue
        assert not isinstance(value, bool) and isinstance(value, int | float), name
        assert math.isfinite(value) and meta["ge"] <= value <= meta["le"], (name, value)
        if f.type == "int":
            assert isinstance(value, int), name
    assert args.height % 8 == 0 and args.width % 8 == 0
    assert args.scheduler in SCHEDULERS
    # the module's way back: to_dict() -> JSON -> parse gives the same settings
    assert GenArgs.parse(json.dumps(args.to_dict())) == args


@settings(max_examples=examples(500), deadline=None)
@given(text=GEN_TEXTS | st.binary(max_size=40))
@example(text='{"steps": 1' + "0" * 400 + "}")  # past float range: was OverflowError
@example(text="[" * 3000)  # past the recursion limit: was RecursionError
@example(text='{"seed": ' + "9" * 5000 + "}")  # past int()'s 4300 digits: was ValueError
def test_gen_args_text_is_parsed_or_refused_naming_the_field(text: str | bytes) -> None:
    try:
        args = GenArgs.parse(text)
    except ConfigError as exc:
        assert str(exc).startswith("gen_args"), exc
        return
    assert_valid_gen_args(args)


# ------------------------------------------------------------------- served request tensors

# What a client can put in one cell of a BYTES tensor (the Python backend hands us objects).
CELLS = st.one_of(
    st.binary(max_size=20),
    st.text(max_size=20),
    st.sampled_from([b"", b"   ", b"\xff\xfe", "x" * 2001, "x" * 4097]),
    GEN_TEXTS.map(str.encode),
    st.integers(),
)
TEXTS = st.text(min_size=1, max_size=20).map(str.encode)
# Per input: mostly what a client means to send (so whole requests are often valid), else any.
INPUT_CELLS = {
    "prompt": weighted((4, TEXTS), (1, st.sampled_from(["x" * 2000, "x" * 2001])), (1, CELLS)),
    "negative_prompt": weighted((4, TEXTS), (1, CELLS)),
    "gen_args": weighted((4, GOOD_GEN_DICTS.map(json.dumps)), (1, st.just(b"{}")), (1, CELLS)),
    "adapter": weighted((4, st.just(b"/adapters/alice")), (1, CELLS)),
    # unix time as text: mostly an hour from now (the user model's), else past, odd or any
    "deadline": weighted(
        (4, st.just(f"{time.time() + 3600:.3f}".encode())),
        (1, st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).encode())),
        (1, CELLS),
    ),
    "auth": weighted((4, st.just(b"0" * 64)), (1, CELLS)),  # its check is the shared base's
}
INPUT_NAMES = [s.name for s in schema.BASE_INPUTS]


@st.composite
def tensors(draw: st.DrawFn, name: str, rows: int) -> np.ndarray | None:
    """An object array of ``rows`` rows in a shape clients send, or in one they should not."""
    shape = draw(st.sampled_from([(rows, 1)] * 6 + [(rows,), (rows, 2), (), (rows + 1, 1), (0, 1)]))
    n = math.prod(shape)
    if draw(st.booleans()):  # one value for every row, as clients mostly send
        cells = [draw(INPUT_CELLS[name])] * n
    else:
        cells = draw(st.lists(INPUT_CELLS[name], min_size=n, max_size=n))
    array = np.empty(shape, dtype=object)
    for index, cell in zip(np.ndindex(shape), cells, strict=True):
        array[index] = cell
    return array


@st.composite
def request_inputs(draw: st.DrawFn) -> dict[str, np.ndarray | None]:
    rows = draw(st.integers(1, 3))
    # each input mostly sent (None: omitted; only the prompt is required)
    return {name: draw(weighted((1, st.none()), (5, tensors(name, rows)))) for name in INPUT_NAMES}


def _rows(value: np.ndarray) -> int:
    return int(np.shape(value)[0]) if np.ndim(value) else 1


def _fake_generate(prompt, negative, args, adapter):
    return [Image.new("RGB", (8, 8), (args.seed % 256, 0, 0))] * args.num_images


@settings(max_examples=examples(300), deadline=None)
@given(inputs=request_inputs())
@example(inputs={"prompt": np.empty((0, 1), dtype=object)})  # zero rows: was an internal error
@example(
    inputs={"prompt": np.array([[b"hi"]], dtype=object), "gen_args": np.array([[b"[" * 3000]])}
)
@example(  # rows of one request must ask for as many images each
    inputs={
        "prompt": np.array([[b"a"], [b"b"]], dtype=object),
        "gen_args": np.array([[b'{"num_images": 2}'], [b"{}"]], dtype=object),
    }
)
def test_request_tensors_are_parsed_or_refused_naming_the_input(inputs: dict) -> None:
    try:
        parsed = parse_request(inputs)
    except RequestError as exc:
        # the message starts with the input (or gen_args field) it is about, or the request
        assert re.match(rf"^({'|'.join([*INPUT_NAMES, 'request'])})\b", str(exc)), exc
        assert exc.client_fault
    else:
        assert len(parsed.rows) == _rows(inputs["prompt"]) >= 1
        assert len({r.args.num_images for r in parsed.rows}) == 1
        for row in parsed.rows:
            assert row.prompt.strip() and len(row.prompt) <= MAX_TEXT_CHARS["prompt"]
            assert row.negative_prompt is None or row.negative_prompt
            assert_valid_gen_args(row.args)
        assert parsed.adapter is None or parsed.adapter
    # What Triton sends back: the images, or the client's own error; never "internal error".
    (result,) = handle_requests([inputs], _fake_generate)
    if isinstance(result, RequestError):
        assert not isinstance(result, InternalError), result
    else:
        assert result.shape == (len(parsed.rows), parsed.rows[0].args.num_images)


# --------------------------------------------------------------------------- MME: TargetModel


def target_model_ok(name: str) -> bool:
    """The TargetModel rule, written independently of the loader's regular expression."""
    parts = name.split("/")
    return (
        len(name) <= 1024
        and name.endswith(".tar.gz")
        and all(p and p[0] in ALNUM and set(p) <= ALNUM | set("._-") for p in parts)
    )


VALID_TARGETS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}(/[A-Za-z0-9][A-Za-z0-9._-]{0,8})?")
TARGETS = st.one_of(
    VALID_TARGETS.map(lambda s: s + ".tar.gz"),
    st.builds(
        lambda a, b, c: a + b + c,
        st.sampled_from(["", "/", "../", "./", "a/../", "s3://b/", "a//"]),
        VALID_TARGETS | st.text(max_size=12),
        st.sampled_from([".tar.gz", ".tar.gz\n", ".tar.gz ", ".tgz", "", "/.tar.gz"]),
    ),
    st.text(max_size=30),
)


@settings(max_examples=examples(300), deadline=None)
@given(name=TARGETS)
@example(name="alice.tar.gz\n")  # '$' matches before a final newline: was accepted
@example(name="a" * 1018 + ".tar.gz")
@example(name="a" * 1019 + ".tar.gz")
def test_target_model_is_checked(name: str) -> None:
    try:
        assert check_target_model(name) == name
    except InvalidTargetModelError as exc:
        assert "TargetModel" in str(exc)
        assert not target_model_ok(name), name
    else:
        assert target_model_ok(name), name
        assert ".." not in PurePosixPath(name).parts and not name.startswith("/")


@pytest.fixture(scope="module")
def empty_loader(tmp_path_factory: pytest.TempPathFactory) -> MultiModelLoader:
    """A loader whose source holds nothing: every TargetModel is refused before Triton (the
    URL points at a closed port and is never called)."""
    root = tmp_path_factory.mktemp("mme-fuzz")
    (root / "source").mkdir()
    return MultiModelLoader("http://127.0.0.1:9", str(root / "source"), root / "models")


def _error_body(status: int, body: bytes, headers: dict[str, str]) -> dict:
    data = json.loads(body)
    assert data["message"] and data["type"] == headers["x-amzn-errortype"], data
    return data


@settings(max_examples=examples(200), deadline=None)
@given(name=TARGETS, body=st.binary(max_size=64), content_type=st.none() | st.text(max_size=10))
@example(name="a" * 300 + ".tar.gz", body=b"{}", content_type=None)  # past NAME_MAX: was 500
def test_invoker_refuses_every_target_model_it_cannot_serve(
    empty_loader: MultiModelLoader, name: str, body: bytes, content_type: str | None
) -> None:
    reply = Invoker(empty_loader).invoke(name, body, content_type)
    headers = {k.lower(): v for k, v in reply.headers}
    data = _error_body(reply.status, reply.body, headers)
    # valid: not in the (empty) source, 404; invalid: a ValidationError naming the header/field
    if name and target_model_ok(name):
        assert (reply.status, data["type"]) == (404, "ValidationError"), data
    else:
        assert (reply.status, data["type"]) == (400, "ValidationError"), data
        assert "TargetModel" in data["message"] or TARGET_MODEL_HEADER in data["message"]
    assert empty_loader.loaded() == []


def _canonical_length(raw: str | None) -> int | None:
    """Content-Length as HTTP defines it (1*DIGIT); None when it is not one."""
    if raw is None or not raw.strip():
        return 0
    raw = raw.strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 4000 else None


# Valid lengths are small (the body is sent) or over the limit (refused before reading).
CONTENT_LENGTHS = st.one_of(
    st.none(),
    st.integers(-10, 200).map(str),
    st.integers(MAX_BODY_BYTES + 1, 10 * MAX_BODY_BYTES).map(str),
    st.text(alphabet="0123456789+-_ .xe", max_size=8),
    st.just("9" * 5000),
)


@settings(max_examples=examples(300), deadline=None)
@given(
    raw=CONTENT_LENGTHS | st.text(max_size=6) | st.sampled_from([str(MAX_BODY_BYTES), "0012"]),
    body=st.binary(max_size=100),
)
@example(raw="1_0", body=b"0123456789")  # int() reads "1_0" as 10: was accepted
@example(raw="+5", body=b"01234")
def test_read_body_takes_exactly_a_valid_content_length(raw: str | None, body: bytes) -> None:
    request = SimpleNamespace(
        headers={} if raw is None else {"Content-Length": raw}, rfile=io.BytesIO(body)
    )
    result = read_body(request)  # type: ignore[arg-type]
    length = _canonical_length(raw)
    if isinstance(result, bytes):
        assert length is not None and length <= MAX_BODY_BYTES, raw
        assert result == body[:length] and len(result) == length
        return
    data = _error_body(result.status, result.body, {k.lower(): v for k, v in result.headers})
    if length is not None and length > MAX_BODY_BYTES:
        assert result.status == 413, (raw, data)
    else:  # not a byte count, or more than was sent
        assert result.status == 400 and "Content-Length" in data["message"], (raw, data)


@pytest.fixture(scope="module")
def front_url(empty_loader: MultiModelLoader):
    with mme_front(empty_loader) as url:
        yield url


def header_safe(text: str) -> bool:
    """Printable latin-1 (what an HTTP header carries), without what surrounds a value."""
    return text == text.strip() and all(" " <= c <= "~" or "\xa1" <= c <= "\xff" for c in text)


PATHS = st.one_of(
    st.just("/endpoints/local-mme/invocations"),
    st.from_regex(r"/endpoints/[A-Za-z0-9-]{0,70}/invocations", fullmatch=True),
    st.from_regex(r"/[A-Za-z0-9/._%-]{0,30}", fullmatch=True),
)


@settings(max_examples=examples(150), deadline=None)
@given(
    path=PATHS,
    name=st.none() | TARGETS.map(str.strip).filter(header_safe),
    raw_length=CONTENT_LENGTHS.map(lambda s: s and s.strip()).filter(lambda s: s != ""),
    body=st.binary(max_size=64),
)
@example(path="/endpoints/e/invocations", name="a.tar.gz", raw_length="1_0", body=b"")
def test_mme_front_answers_raw_http_with_a_sagemaker_error(
    front_url: str, path: str, name: str | None, raw_length: str | None, body: bytes
) -> None:
    host, port = front_url.removeprefix("http://").split(":")
    length = _canonical_length(raw_length)
    valid_path = re.fullmatch(r"/endpoints/[A-Za-z0-9-]{1,63}/invocations", path)
    # Send the declared bytes only where the server reads them (unread bytes at close reset the
    # connection): a server that reads an invalid length as a number waits for bytes that never
    # come, a hang.
    sent = b""
    if valid_path and length is not None and length <= MAX_BODY_BYTES:
        sent = (body * (length // max(len(body), 1) + 1))[:length].ljust(length, b" ")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        if name is not None:
            conn.putheader(TARGET_MODEL_HEADER, name.encode("latin-1"))
        if raw_length is not None:
            conn.putheader("Content-Length", raw_length)
        conn.endheaders(sent)
        response = conn.getresponse()
        status, answer = response.status, response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    data = _error_body(status, answer, headers)
    if not valid_path:
        assert (status, data["type"]) == (404, "UnknownOperation")
    elif length is None:
        assert status == 400
    elif length > MAX_BODY_BYTES:
        assert status == 413
    elif name and target_model_ok(name):
        assert (status, data["type"]) == (404, "ValidationError")
    else:
        assert (status, data["type"]) == (400, "ValidationError")


# ---------------------------------------------------------------------------------- tar members

# Benign names: odd but legal characters, '.' parts, a trailing '/'.
NAME_PARTS = st.one_of(
    st.sampled_from(["a", "b", "c.txt", "sub", ".", "é", "a b", "a\\b", "~", "*", "..."]),
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/\x00"), max_size=8),
)
BENIGN_NAMES = st.builds(
    lambda prefix, parts, suffix: prefix + "/".join(parts) + suffix,
    st.sampled_from(["", "", "./"]),
    st.lists(NAME_PARTS, min_size=1, max_size=3),
    st.sampled_from(["", "", "/"]),
)
FILE_KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE])
BAD_KINDS = st.sampled_from(
    [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, b"Z"]
)  # b"Z": a type no tar defines
LINK_TARGETS = st.sampled_from(["/etc/passwd", "../../outside.txt", "..", "a", "sub/b"])


@st.composite
def archive_members(draw: st.DrawFn) -> list[tuple[str, bytes, bytes, str]]:
    """(name, type, data, linkname) of a few benign members, and often one hostile member:
    an absolute or '..' name, a link, a device, a FIFO, an unknown type, a name given twice,
    or a member inside a file. Each is one draw away, so each reason is tried often."""
    row = st.tuples(BENIGN_NAMES, FILE_KINDS, st.binary(max_size=40), st.just(""))
    members = draw(st.lists(row, max_size=4))
    names = [m[0] for m in members]
    hostile = draw(
        st.sampled_from(["none", "name", "type", "long"] + ["twice", "inside"] * bool(names))
    )
    benign = draw(BENIGN_NAMES)
    if hostile == "long":  # just inside or past a bound: parts, bytes of a part, of the name
        size = draw(st.integers(-1, 1))
        name = draw(
            st.sampled_from(
                [
                    "/".join(["d"] * (MAX_DEPTH + size)),
                    "x/" + "é" * (MAX_PART_BYTES // 2) + "e" * (1 + size),
                    ("h" * 127 + "/") * 7 + "i" * (MAX_NAME_BYTES - 7 * 128 + size),
                ]
            )
        )
        members.append((name, draw(FILE_KINDS), b"w", ""))
    elif hostile == "name":
        prefix = draw(st.sampled_from(["/", "//", "../", "a/../../", "sub/../"]))
        members.append((prefix + benign, draw(FILE_KINDS), b"x", ""))
    elif hostile == "type":
        target = draw(LINK_TARGETS | st.sampled_from(names or ["a"]))
        members.append((benign, draw(BAD_KINDS), b"", target))
    elif hostile == "twice":
        name = draw(st.sampled_from(names))
        members.append((draw(st.sampled_from(["", "./"])) + name, draw(FILE_KINDS), b"y", ""))
    elif hostile == "inside":
        name = draw(st.sampled_from(names)).rstrip("/")
        members.append((name + "/" + benign, draw(FILE_KINDS), b"z", ""))
    return draw(st.permutations(members))


COMPRESSIONS = st.sampled_from(["", "gz", "bz2", "xz"])


def _write_tar(path: Path, members: list, compression: str, fmt: int) -> None:
    with tarfile.open(path, f"w:{compression}", format=fmt) as tar:
        for name, kind, data, linkname in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, linkname, 0o755
            if kind in (tarfile.REGTYPE, tarfile.CONTTYPE):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root (links not followed): its kind and, for files, its bytes."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st_ = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(st_.st_mode) else None
            out[str(path.relative_to(root))] = (stat.S_IFMT(st_.st_mode), data)
    return out


def _archive_is_safe(tar_path: Path) -> bool | None:
    """What safe_extract must accept, judged from the members as tarfile reads them: only
    files and folders, relative names without '..', no name twice, no file that another
    member lies inside. None: tarfile itself cannot read the archive."""
    try:
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError):
        return None
    seen, files, parents = set(), set(), set()
    for m in members:
        path = PurePosixPath(m.name)
        if len(m.name.encode()) > MAX_NAME_BYTES or len([p for p in path.parts if p != "."]) > (
            MAX_DEPTH
        ):
            return False
        if any(len(p.encode()) > MAX_PART_BYTES for p in path.parts):
            return False
        if not m.name or m.name.startswith("/") or ".." in path.parts:
            return False
        if not (m.isfile() or m.isdir()) or m.issparse() or "\x00" in m.name:
            return False
        rel = PurePosixPath(*[p for p in path.parts if p != "."])
        if (not rel.parts and not m.isdir()) or rel in seen:
            return False
        if any(p in files for p in rel.parents) or (m.isfile() and rel in parents):
            return False
        seen.add(rel)
        parents.update(rel.parents)
        if m.isfile():
            files.add(rel)
    return True


def _check_extraction(tar_path: Path, root: Path, overwrite: bool, judge: bool = True) -> None:
    """The property of safe_extract for the archive at tar_path, extracted under root/out;
    ``judge``: also hold it to :func:`_archive_is_safe` and compare the files' bytes (not for
    corrupt archives, whose headers may read well and whose data may not)."""
    dest = root / "out" / "dest"
    dest.parent.mkdir()  # as the MME loader's work folder: only dest is safe_extract's
    if overwrite:
        dest.mkdir()
        (dest / "old.txt").write_bytes(b"old")
    (root / "outside.txt").write_bytes(b"keep")
    before = _snapshot(root)
    expect_safe = _archive_is_safe(tar_path) if judge else None
    try:
        files = safe_extract(tar_path, dest, overwrite=overwrite)
    except UnsafeArchiveError as exc:
        assert str(tar_path) in str(exc)  # names the archive (and the member, when it can)
        assert _snapshot(root) == before  # nothing behind: no dest, no partial folder
        assert expect_safe is not True, f"a safe archive was refused: {exc}"
        return
    assert expect_safe in (True, None)
    after = _snapshot(root)

    def inside(rel: str) -> bool:
        return Path(root, rel).is_relative_to(dest)

    assert {k: v for k, v in after.items() if not inside(k)} == {
        k: v for k, v in before.items() if not inside(k)
    }
    on_disk = {k: v for k, v in after.items() if inside(k)}
    assert all(kind in (stat.S_IFREG, stat.S_IFDIR) for kind, _ in on_disk.values())
    real = dest.resolve()
    assert all(f.resolve().is_relative_to(real) for f in files)
    assert {str(f.relative_to(root)) for f in files} == {
        k for k, (kind, _) in on_disk.items() if kind == stat.S_IFREG
    }
    if not judge:
        return
    with tarfile.open(tar_path) as tar:  # every file holds its member's bytes
        for member in tar.getmembers():
            if member.isfile():
                rel = PurePosixPath(*[p for p in PurePosixPath(member.name).parts if p != "."])
                assert (dest / rel).read_bytes() == tar.extractfile(member).read()


@settings(max_examples=examples(250), deadline=None)
@given(
    members=archive_members(),
    compression=COMPRESSIONS,
    fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    overwrite=st.booleans(),
)
@example(
    members=[("a", tarfile.REGTYPE, b"x", ""), ("a/b", tarfile.REGTYPE, b"y", "")],
    compression="gz",
    fmt=tarfile.PAX_FORMAT,
    overwrite=False,
)  # a file with a member inside it: was FileExistsError
@example(
    members=[("a/b", tarfile.REGTYPE, b"x", ""), ("a", tarfile.REGTYPE, b"y", "")],
    compression="",
    fmt=tarfile.PAX_FORMAT,
    overwrite=True,
)
def test_safe_extract_keeps_everything_inside_or_refuses_and_leaves_nothing(
    members: list, compression: str, fmt: int, overwrite: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tar_path = root / "in.tar"
        _write_tar(tar_path, members, compression, fmt)
        _check_extraction(tar_path, root, overwrite)


def _good_archive(compression: str) -> bytes:
    """A small valid model archive; compressible, so flipped bytes hit the decompressor."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for i in range(5):
            name, data = f"m/{i}/model.py", b"print('model %d')\n" % i * 300
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GOOD_ARCHIVES = {c: _good_archive(c) for c in ("", "gz", "bz2", "xz")}


@st.composite
def mutated_bytes(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few bytes overwritten (mostly), or cut short, or with bytes inserted."""
    data = bytearray(draw(st.sampled_from(seeds)))
    rnd = draw(st.randoms(use_true_random=False))  # positions spread over the whole seed
    kind = draw(st.sampled_from(["overwrite", "overwrite", "overwrite", "cut", "insert"]))
    if kind == "overwrite":
        for _ in range(draw(st.integers(1, 3))):
            data[rnd.randrange(len(data))] = draw(st.integers(0, 255))
    elif kind == "cut":
        del data[rnd.randrange(len(data)) :]
    else:
        at = rnd.randrange(len(data))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _overwritten(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1 :]


@settings(max_examples=examples(250), deadline=None)
@given(data=mutated_bytes(list(GOOD_ARCHIVES.values())) | st.binary(max_size=200))
@example(data=_overwritten(GOOD_ARCHIVES["xz"], 24, 0xFF))  # was lzma.LZMAError
@example(data=_overwritten(GOOD_ARCHIVES["bz2"], 10, 0x00))  # was OSError("Invalid data stream")
def test_safe_extract_of_corrupt_archives(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tar_path = root / "in.tar"
        tar_path.write_bytes(data)
        _check_extraction(tar_path, root, overwrite=False, judge=False)


# --------------------------------------------------------------------------------- image headers


def _real_images(side: int) -> list[bytes]:
    """Small real encoder outputs: a JPEG with an EXIF orientation, a PNG with alpha, a palette
    PNG, a WebP; of a crop of the public-domain astronaut portrait, ``side`` pixels square."""
    from skimage import data as skdata

    face = Image.fromarray(skdata.astronaut()[:200, 120:320]).resize((side, side))
    out = []
    for fmt, image, extra in [
        ("JPEG", face, {"exif": _exif_orientation(6), "quality": 80}),
        ("PNG", face.convert("RGBA"), {}),
        ("PNG", face.convert("P"), {}),
        ("WEBP", face, {"quality": 60}),
    ]:
        buf = io.BytesIO()
        image.save(buf, fmt, **extra)
        out.append(buf.getvalue())
    return out


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


MIN_SIDE, MAX_PIXELS = 16, 64 * 64
REAL_IMAGES = _real_images(40)  # accepted
REFUSED_IMAGES = _real_images(8) + _real_images(72)  # too small, too many pixels


@settings(max_examples=examples(300), deadline=None)
@given(
    data=st.one_of(
        mutated_bytes(REAL_IMAGES + REFUSED_IMAGES),
        st.builds(lambda seed, tail: seed[:32] + tail, st.sampled_from(REAL_IMAGES), st.binary()),
        st.binary(max_size=64),
    )
)
def test_image_bytes_decode_to_a_photo_or_a_rejection_reason(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.jpg"
        path.write_bytes(data)
        try:
            photo = load_photo(path, min_side=MIN_SIDE, max_pixels=MAX_PIXELS)
        except Rejected as exc:
            assert str(exc).strip()  # the reason the manifest shows
            return
        assert path.read_bytes() == data  # the upload is never modified
    assert isinstance(photo, Photo) and photo.format in FORMATS
    assert photo.pixels.dtype == np.uint8 and photo.pixels.ndim == 3
    assert photo.pixels.shape[2] == 3
    assert min(photo.width, photo.height) >= MIN_SIDE
    assert photo.width * photo.height <= MAX_PIXELS
    assert 1 <= photo.orientation <= 8


def test_the_seed_images_are_accepted_or_refused_for_their_size(tmp_path: Path) -> None:
    # the fuzzing's seeds: photos intake accepts, and photos it refuses for their size only
    path = tmp_path / "x"
    for data in REAL_IMAGES + REFUSED_IMAGES:
        path.write_bytes(data)
        if data in REAL_IMAGES:
            assert load_photo(path, min_side=MIN_SIDE, max_pixels=MAX_PIXELS).width == 40
        else:
            with pytest.raises(Rejected, match="too small|too large"):
                load_photo(path, min_side=MIN_SIDE, max_pixels=MAX_PIXELS)


# ----------------------------------------------------------------------------------- user ids


def id_ok(value: object) -> bool:
    """The id rule, written independently of names.py's regular expression."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 63
        and value[0] in ALNUM
        and set(value) <= ALNUM | set("_-")
    )


IDS = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,70}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", fullmatch=True).map(lambda s: s + "\n"),
    st.sampled_from([*RESERVED_USERS, *(p + "x" for p in RESERVED_PREFIXES), "..", "a/b", ""]),
    st.text(max_size=70),
    SCALARS,
)


@settings(max_examples=examples(300), deadline=None)
@given(user=IDS, field=st.sampled_from(["user", "job.user", "owner"]))
@example(user="alice\n", field="user")  # '$' matches before a final newline: was accepted
def test_user_ids_follow_the_one_rule(user: object, field: str) -> None:
    try:
        assert check_user_id(user, field=field) == user
    except InvalidNameError as exc:
        assert str(exc).startswith(f"{field}: ")
        assert not id_ok(user) or user in RESERVED_USERS or user.startswith(RESERVED_PREFIXES)
        return
    assert id_ok(user) and user not in RESERVED_USERS
    assert not user.startswith(RESERVED_PREFIXES)
    # accepted here, accepted everywhere it goes: a path part, an S3 key, a TargetModel
    assert Path(user).name == user and PurePosixPath(user).parts == (user,)
    assert check_target_model(f"{user}.tar.gz")


@settings(max_examples=examples(200), deadline=None)
@given(job_id=IDS)
@example(job_id="job-1\n")
def test_job_ids_follow_the_one_rule(job_id: object) -> None:
    try:
        assert check_job_id(job_id) == job_id
    except InvalidNameError as exc:
        assert str(exc).startswith("job_id: ") and not id_ok(job_id)
    else:
        assert id_ok(job_id)


# --------------------------------------------------------------------------- training requests

VALID_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
# Keys from a few words: a work prefix often lies inside the models prefix, names often repeat.
GOOD_KEYS = st.lists(
    st.sampled_from(["af", "photos", "models", "jobs", "alice", "x1"]), min_size=1, max_size=3
).map("/".join)
BAD_KEYS = st.lists(
    st.sampled_from(["af", "..", ".", "", "a b", "é", "x*y", "c\x01", "d\\e"])
    | st.text(max_size=6),
    max_size=4,
).map("/".join)
BAD_URIS = st.one_of(
    st.builds(
        lambda b, k: f"s3://{b}/{k}",
        st.sampled_from(["bucket", "my.bucket-1", "Bad_Bucket", "ab", "b" * 64, "", "-x-"]),
        BAD_KEYS,
    ),
    st.builds(lambda k: f"s3://bucket/{k}" + "k" * 1020, GOOD_KEYS),  # past S3's 1024 bytes
    st.text(max_size=20),
    SCALARS,
)
PREFIXES = weighted(
    (8, st.builds(lambda k, end: f"s3://bucket/{k}{end}", GOOD_KEYS, st.sampled_from(["", "/"]))),
    (1, st.just("s3://bucket/")),  # the bucket's root
    (1, BAD_URIS),
)
PHOTO_LISTS = weighted(
    (6, st.lists(weighted((9, GOOD_KEYS.map(lambda k: f"s3://bucket/{k}.jpg")), (1, BAD_URIS)))),
    (1, st.integers(30, 31).map(lambda n: [f"s3://bucket/p/{i}.jpg" for i in range(n)])),
)  # 31: past the service's max_photos


def _override_values(key: str, bound) -> st.SearchStrategy:
    """Mostly in bounds, sometimes just past one, rarely anything."""
    if bound.kind is bool:
        good = edge = st.booleans()
    elif bound.kind is str:
        good, edge = st.text(max_size=bound.max_len), st.just("t" * (bound.max_len + 1))
    elif bound.kind is int:
        good = st.integers(int(bound.ge), int(bound.le))
        if key == "resolution":  # a multiple of 8, or the merged config refuses it
            good = good.map(lambda v: max(int(bound.ge), v - v % 8))
        edge = st.sampled_from([int(bound.ge) - 1, int(bound.le) + 1])
    else:
        good, edge = st.floats(bound.ge, bound.le), st.sampled_from([-1.0, bound.le * 1.5])
    return weighted((12, good), (2, edge), (1, SCALARS))


def _overrides(allowed: dict) -> st.SearchStrategy:
    """A few overrides (more make a valid request rare), or not an object of overrides at all."""
    some = st.lists(st.sampled_from(sorted(allowed)), max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: _override_values(k, allowed[k]) for k in keys})
    )
    return weighted(
        (6, some),
        (1, st.dictionaries(st.sampled_from(sorted(allowed)) | st.text(max_size=6), SCALARS)),
        (1, JSON_VALUES),
    )


# The service's deployment prefix (fixtures.jobs.S3_PREFIX): a request that reads or writes
# anywhere else is refused, so its prefixes are drawn often, the work prefix also as the
# deployment's root (which holds the models prefix) and photos under the user's own folder.
DEPLOYMENT = S3_PREFIX
OWN_PHOTOS = ["", "j1/", "a/b/"]


@st.composite
def job_dicts(draw: st.DrawFn) -> dict:
    job = draw(
        st.fixed_dictionaries(
            {
                "job_id": weighted((9, VALID_IDS), (1, IDS)),
                "user": weighted((9, VALID_IDS), (1, IDS)),
                "photos": weighted((3, PREFIXES), (2, PHOTO_LISTS)),
                "models_prefix": weighted((3, st.just(DEPLOYMENT + "models/")), (2, PREFIXES)),
            },
            optional={
                "work_prefix": weighted(
                    (3, st.sampled_from([DEPLOYMENT + "jobs/", DEPLOYMENT + "jobs"])),
                    (1, st.sampled_from([DEPLOYMENT, DEPLOYMENT + "models/jobs/"])),
                    (2, PREFIXES),
                ),
                "train": _overrides(TRAIN_OVERRIDES),
                "preprocess": _overrides(PREPROCESS_OVERRIDES),
            },
        )
    )
    if isinstance(job["user"], str) and draw(st.integers(0, 2)):  # under its own folder
        own = f"{DEPLOYMENT}photos/{draw(st.sampled_from([job['user'], 'bob']))}/"
        own += draw(st.sampled_from(OWN_PHOTOS))
        names = st.lists(st.sampled_from(["1.jpg", "2.png", "x/3.jpg"]), min_size=1, unique=True)
        job["photos"] = draw(st.just(own) | names.map(lambda ns: [own + n for n in ns]))
    return job


JOB_DICTS = job_dicts()
JOB_BODIES = weighted(
    (6, JOB_DICTS),
    (2, JOB_DICTS.map(json.dumps)),
    (2, JOB_DICTS.map(lambda d: json.dumps(d).encode())),
    (1, JOB_DICTS.map(lambda d: {**d, "priority": 1})),  # not a field of a request
    (1, truncations(JOB_DICTS.map(json.dumps))),
    (1, JSON_VALUES.map(json.dumps)),
    (1, DEEP_JSON),
    (1, st.binary(max_size=40)),
)
VALID_JOB = {
    "job_id": "j1",
    "user": "alice",
    "photos": f"{DEPLOYMENT}photos/alice/",
    "models_prefix": f"{DEPLOYMENT}models/",
}
# Where an error message must start: the field it is about, or the request as a whole.
JOB_FIELD_RE = re.compile(
    rf"^(request|unknown field|missing required field|(?:{'|'.join(FIELDS)})\b)"
)


@pytest.fixture(scope="module")
def service_config(tmp_path_factory: pytest.TempPathFactory):
    return make_service_config(tmp_path_factory.mktemp("service"))


def assert_valid_job(request: JobRequest, config) -> None:
    assert check_job_id(request.job_id) and check_user_id(request.user)
    for prefix in (request.models_prefix, request.work_prefix):
        assert prefix.startswith("s3://") and prefix.endswith("/")
    assert not request.work_prefix.startswith(request.models_prefix)
    assert not request.models_prefix.startswith(request.work_prefix)  # job_id 'models' (#22)
    # only the deployment's prefixes, only the user's own photos (#22)
    assert (request.models_prefix, request.work_prefix) == (config.models_prefix,
                                                           config.jobs_prefix)  # fmt: skip
    own = f"{config.photos_prefix}{request.user}/"
    photos = [request.photos] if isinstance(request.photos, str) else request.photos
    assert all(uri.startswith(own) for uri in photos), (own, photos)
    if isinstance(request.photos, str):
        assert request.photos.startswith("s3://") and request.photos.endswith("/")
    else:
        assert 1 <= len(request.photos) <= config.max_photos
        names = [uri.rpartition("/")[2] for uri in request.photos]
        assert all(names) and len(set(names)) == len(names)
    for section, allowed in (("train", TRAIN_OVERRIDES), ("preprocess", PREPROCESS_OVERRIDES)):
        for key, value in getattr(request, section).items():
            bound = allowed[key]
            assert type(value) is bound.kind, (section, key, value)
            if bound.kind in (int, float):
                assert bound.ge <= value <= bound.le, (section, key, value)
            elif bound.kind is str:
                assert len(value) <= bound.max_len
    # the module's way back: to_dict() -> JSON -> parse gives the same request
    assert parse_job_request(json.dumps(request.to_dict()), config) == request


@settings(max_examples=examples(400), deadline=None)
@given(body=JOB_BODIES)
@example(body=json.dumps(VALID_JOB | {"train": {"steps": 10**400}}))  # was OverflowError
@example(body="[" * 3000)  # was RecursionError
@example(body='{"job_id": ' + "9" * 5000 + "}")  # was ValueError (int() digit limit)
# the default work prefix, 'jobs/' beside the models prefix, was the models prefix itself
@example(body=VALID_JOB | {"models_prefix": "s3://bucket/jobs"})
# a work prefix that holds the models prefix: job_id 'models' named a model's key (#22)
@example(body=VALID_JOB | {"job_id": "models", "user": "checkpoint", "work_prefix": DEPLOYMENT})
@example(body=VALID_JOB | {"photos": f"{DEPLOYMENT}photos/bob/"})  # another user's (#22)
def test_training_requests_are_parsed_or_refused_naming_the_field(
    service_config, body: dict | str | bytes
) -> None:
    try:
        request = parse_job_request(body, service_config)
    except JobRequestError as exc:
        assert exc.status == 400
        assert JOB_FIELD_RE.match(str(exc)), exc
        return
    assert_valid_job(request, service_config)


# ---------------------------------------------------------------------------------- style packs

PACK_KEYS = ["description", "defaults", "styles", "framings", "styels", "negative_prompt"]
PACK_TEXTS = weighted(
    (16, st.sampled_from(["a photo of {token} person", "{token} as a {framing} portrait"])),
    (1, st.text(max_size=30)),
    (1, st.sampled_from(["{token", "{other} {token}", "{0} {token}", "no token here", ""])),
    # a format spec or conversion: str.format acts on it (a huge width allocates gigabytes)
    (1, st.builds("{{token}} {{{}{}{}}}".format, st.sampled_from(["token", "framing"]),
                  st.sampled_from(["", "!r", "!s", "!a"]),
                  st.sampled_from(["", ":>9", ":^" + "9" * 20, ":{framing}", ":x"]))),
)  # fmt: skip


def _valid_gen_value(field: dataclasses.Field) -> st.SearchStrategy:
    meta = field.metadata
    if meta["choices"]:
        return st.sampled_from(meta["choices"])
    if field.type == "float":
        return st.floats(meta["ge"], meta["le"])
    return st.integers(int(meta["ge"]), int(meta["le"]))


VALID_GEN_DICTS = st.fixed_dictionaries(
    {}, optional={n: _valid_gen_value(f) for n, f in GEN_FIELDS.items()}
)
PACK_GEN_ARGS = weighted(
    (10, VALID_GEN_DICTS),
    (1, st.dictionaries(
        st.sampled_from(["steps", "seed", "height", "width", "guidance_scale", "cfg"]),
        st.one_of(st.integers(-5, 5000), st.floats(allow_nan=False, width=32), st.text(max_size=5)),
        max_size=4,
    )),
)  # fmt: skip


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or math.isfinite(value) else "nan"
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


@st.composite
def pack_texts(draw: st.DrawFn) -> str:
    """TOML as people write packs: mostly the right shape, with wrong fields, types, braces and
    gen_args mixed in; sometimes any text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=200))
    lines = []
    if draw(st.booleans()):
        lines.append(f"description = {_toml_value(draw(st.text(max_size=20)))}")
    if draw(st.booleans()):
        lines.append("[defaults]")
        lines.append(f"gen_args = {_toml_value(draw(PACK_GEN_ARGS))}")
    for table, text_key in (("styles", "prompt"), ("framings", "text")):
        for i in range(draw(weighted((1, st.just(0)), (6, st.integers(1, 3))))):
            lines.append(f"[[{table}]]")
            name = draw(weighted((12, st.just(f"{table[:-1]}{i}")), (1, st.text(max_size=5))))
            lines.append(f"name = {_toml_value(name)}")
            lines.append(f"{text_key} = {_toml_value(draw(PACK_TEXTS))}")
            if draw(st.booleans()):
                lines.append(f"gen_args = {_toml_value(draw(PACK_GEN_ARGS))}")
            if draw(st.integers(0, 12)) == 0:
                lines.append(f"{draw(st.sampled_from(PACK_KEYS))} = 1")
    return "\n".join(lines) + "\n"


@settings(max_examples=examples(300), deadline=None)
@given(text=pack_texts(), name=weighted((6, st.just("mine")), (1, st.text(max_size=8))))
@example(text='[[styles]]\nname = "a"\nprompt = "{token"\n[[framings]]\nname = "b"\ntext = "x"\n',
         name="mine")  # fmt: skip
def test_style_packs_are_parsed_or_refused_naming_the_field(text: str, name: str) -> None:
    from avatarforge.packs import PackError, parse_pack

    try:
        pack = parse_pack(text, name, source="mine.toml")
    except PackError as exc:
        assert str(exc).startswith("mine.toml: "), exc
        assert exc.client_fault
        return
    # a pack that reads renders: every avatar names the person, with gen_args a request takes
    items = pack.items(token="<<TOK>>")
    assert 1 <= len(items) <= 64
    for item in items:
        assert "<<TOK>>" in item.prompt
        assert GenArgs.from_dict(item.gen_args).to_dict() == item.gen_args
