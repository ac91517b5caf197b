"""Output directories that are checked before any work, written atomically and cleaned up on
signals; safe tensor loading. The contract is described in docs/refusals.md."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .constants import TOKENIZER_FILES
from .errors import CheckpointError, OutputExistsError

# Written into a directory that is being filled in place (the demo's output); it names the writing
# process, so that a later run can tell a partial output left by a killed run from a finished one.
INCOMPLETE_MARKER = ".adalora-incomplete"
# Extensions matplotlib writes for --plot (it picks the format from the extension).
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_output_dir(
    out: str | os.PathLike, overwrite: bool = False, sources: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Refuse an output directory that cannot or must not be written, before any work is done.

    Refused: an empty name; the current directory, the home directory, the root or any of their
    ancestors; a directory that is, contains or lies inside one of `sources` (the inputs of the
    command); an existing file; an existing non-empty directory unless `overwrite`; a location
    whose nearest existing parent is a file or not writable. Leftovers of a killed earlier run
    beside `out` are cleaned up first (see `recover_output_dir`).

    Returns:
        `out` as a Path.
    """
    if not str(out).strip():
        raise OutputExistsError("--out is empty: name a new directory, e.g. --out runs/ckpt")
    out = Path(out)
    target = out.resolve()
    _refuse_protected(target)
    for source in sources:
        if source is not None and str(source).strip() and Path(source).exists():
            _refuse_overlap(target, Path(source).resolve())
    recover_output_dir(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
    _check_writable(target)
    return out


def _refuse_protected(target: Path) -> None:
    # Replacing one of these would delete the user's working files (`--out "" --overwrite` once
    # wiped the current directory).
    for name, place in (("the current directory", Path.cwd()), ("the home directory", Path.home())):
        place = place.resolve()
        if target == place or target in place.parents:
            raise OutputExistsError(f"--out {target} is {name} or one of its parents: name a new sub-directory")


def _refuse_overlap(target: Path, source: Path) -> None:
    if target == source:
        relation = "is"
    elif source in target.parents:
        relation = "lies inside"
    elif target in source.parents:
        relation = "contains"
    else:
        return
    raise OutputExistsError(f"--out {target} {relation} the input {source}: choose a separate output directory")


def _check_writable(target: Path) -> None:
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(f"cannot create {target}: {parent} is a file, not a directory; choose another --out")
    try:  # a real probe: os.access says yes to root on a read-only file system
        probe = tempfile.mkdtemp(prefix=".adalora-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise OutputExistsError(
            f"cannot write in {parent} ({err.strerror}): choose a writable --out or fix the permissions") from None


def check_output_file(path: str | os.PathLike, overwrite: bool = False, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse an output file before any work: an existing directory, an existing file unless
    `overwrite`, a name without one of `suffixes` (when given), an unwritable location."""
    path = Path(path)
    if not path.name:
        raise OutputExistsError(f"output file name {str(path)!r} is empty: name a file")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory: name a file to write")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists: choose another path or pass --overwrite")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputExistsError(f"{path} has no image extension: end it with one of {', '.join(suffixes)}")
    _check_writable(path.resolve())
    return path


def recover_output_dir(out: str | os.PathLike) -> None:
    """Undo what a run killed with SIGKILL left beside `out`: temporary directories
    (`.OUT.tmp-PID-*`) and partial outputs (a directory holding INCOMPLETE_MARKER) of dead processes
    are removed, and the user's previous output that such a run had moved to `.OUT.old-PID` is put
    back."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        if _dead_owner(tmp.name[len(f".{out.name}.tmp-"):].split("-")[0]):
            shutil.rmtree(tmp, ignore_errors=True)
    marker = out / INCOMPLETE_MARKER
    if marker.is_file() and _dead_owner(marker.read_text().strip()):
        shutil.rmtree(out, ignore_errors=True)
        print(f"removed {out}: the partial output of a run that was killed", file=sys.stderr)
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not _dead_owner(old.name.rsplit("-", 1)[-1]):
            continue
        if out.exists():  # the killed run had finished its output: the old one was due for removal
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(out)
            print(f"restored {out} from {old.name}, left by a run that was killed", file=sys.stderr)


def _dead_owner(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path: Path, directory: bool) -> None:
    # mkdtemp/mkstemp create 0700/0600; give the modes open() and mkdir() would have given.
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike, overwrite: bool = False, sources: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename.

    On any exception (SIGTERM and SIGINT included, see `signals_as_exit`) the temporary directory
    is removed and `out` is left as it was.
    """
    out = check_output_dir(out, overwrite, sources).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.tmp-{os.getpid()}-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        _as_created(tmp, directory=True)
        yield tmp
    except BaseException:
        # By name, not by `tmp`: a signal can land after mkdtemp made the directory but before `tmp` is set.
        for left in out.parent.glob(glob.escape(prefix) + "*"):
            shutil.rmtree(left, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def signals_as_exit() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit (SIGINT already raises KeyboardInterrupt) while the
    block runs, so that a killed command unwinds and removes its temporary outputs like a failed
    one. A second signal during that cleanup is ignored. Only possible from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        print(f"\nstopped by {signal.Signals(signum).name}: removing temporary outputs", file=sys.stderr)
        sys.exit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path` (same suffix, so writers that infer the
    format from it still work), then rename it over `path`: a reader never sees half a file, and a
    failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        _as_created(Path(tmp), directory=False)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object from `path`; a missing, unreadable or non-object file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{what} {path} is not valid JSON ({str(err)[:160]}): re-create it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a JSON {type(data).__name__}, not an object: re-create it")
    return data


def check_tokenizer_files(model_dir: str | os.PathLike, fix: str) -> None:
    """Raise CheckpointError naming the files looked for when a local directory has no tokenizer
    (transformers would fail deep inside with an unrelated message)."""
    model_dir = Path(model_dir)
    if model_dir.is_dir() and not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): {fix}")


def load_safetensors(path: str | os.PathLike, what: str = "weights") -> dict:
    """Load a safetensors file on CPU, turning truncation or corruption into a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({err}): re-create it") from err


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
