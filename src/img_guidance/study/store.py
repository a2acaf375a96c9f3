"""A study folder and its database.

    STUDY_DIR/study.sqlite     the pairs, raters, their trials and votes (SQLite, WAL mode)
    STUDY_DIR/images/          the pairs' images, copied in and named by the sha1 of their bytes
    STUDY_DIR/invites.txt      invite codes (``study invite``), one a line
    STUDY_DIR/results/         what ``study results`` writes

The images are copied so that the study stays what it was when the sources are regenerated, and so
that the web app serves files it looked up in the database, never a path taken from a request; their
names (content hashes) do not say which system made them.

Every write is one ``BEGIN IMMEDIATE`` transaction, committed (``synchronous=FULL``) before the call
returns, so a vote the app acknowledged survives a killed server, and concurrent raters are
serialised by SQLite (one writer at a time, readers never blocked in WAL mode). A rater has one vote
per trial: voting again replaces it. Every vote and undo is also appended to ``log``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import unicodedata
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from img_guidance.study.pairs import CHOICES, SourcePair, outcome, rater_trials
from img_guidance.study.stats import Vote

DATABASE = "study.sqlite"
IMAGES = "images"
INVITES = "invites.txt"
SCHEMA_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_QUESTION = "Which image matches the prompt better?"
MAX_RATER_LENGTH = 100
# invite codes: no 0/O, 1/l/I, so they survive being read aloud or copied by hand
INVITE_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- JSON values
CREATE TABLE images (id INTEGER PRIMARY KEY, file TEXT NOT NULL UNIQUE, source TEXT NOT NULL);
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    seed INTEGER,
    a_image INTEGER NOT NULL REFERENCES images(id),
    b_image INTEGER NOT NULL REFERENCES images(id),
    is_check INTEGER NOT NULL CHECK (is_check IN (0, 1))
);
CREATE TABLE invites (code TEXT PRIMARY KEY, created_at TEXT NOT NULL);
CREATE TABLE raters (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL);
CREATE TABLE trials (
    id INTEGER PRIMARY KEY,
    rater INTEGER NOT NULL REFERENCES raters(id),
    position INTEGER NOT NULL,
    pair INTEGER NOT NULL REFERENCES pairs(id),
    a_left INTEGER NOT NULL CHECK (a_left IN (0, 1)),
    repeat INTEGER NOT NULL CHECK (repeat IN (0, 1)),
    UNIQUE (rater, position),
    UNIQUE (rater, pair, repeat)
);
CREATE TABLE votes (
    trial INTEGER PRIMARY KEY REFERENCES trials(id),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')),
    outcome TEXT NOT NULL CHECK (outcome IN ('a', 'b', 'tie')),
    seq INTEGER NOT NULL,  -- the log entry that cast it: the order of votes, for undo
    cast_at TEXT NOT NULL
);
CREATE TABLE log (
    id INTEGER PRIMARY KEY,
    trial INTEGER NOT NULL REFERENCES trials(id),
    action TEXT NOT NULL CHECK (action IN ('vote', 'undo')),
    choice TEXT,
    at TEXT NOT NULL
);
"""


class StudyError(ValueError):
    """Bad input to a study: the message names the bad value."""


class UnknownRater(StudyError, LookupError):
    """A rater the study has not seen (or, with invites, a name that is not an invite code)."""


class UnknownPair(StudyError, LookupError):
    """A trial id that is not one of the rater's."""


class NotInvited(StudyError, PermissionError):
    """A name that is not one of the study's invite codes, where the study requires one."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_rater(name: Any) -> str:
    """A rater's name (or invite code) with outer spaces removed; a StudyError names a bad one."""
    if not isinstance(name, str) or not name.strip():
        raise StudyError(f"rater must be a non-empty name, got {name!r}")
    name = name.strip()
    if len(name) > MAX_RATER_LENGTH:
        raise StudyError(f"rater must be at most {MAX_RATER_LENGTH} characters, got {len(name)}")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise StudyError(f"rater must not hold control characters, got {name!r}")
    return name


def check_choice(choice: Any) -> str:
    if choice not in CHOICES:
        raise StudyError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def create_study(
    root: str | os.PathLike,
    pairs: Sequence[SourcePair],
    checks: Sequence[int],
    *,
    names: tuple[str, str],
    seed: int,
    question: str = DEFAULT_QUESTION,
    sources: dict[str, str] | None = None,
) -> StudyStore:
    """Write a new study folder at ``root`` (absent or empty): the images copied in, the pairs (the
    ``checks``-th of them marked as check pairs), and the settings. It is built beside ``root`` and
    moved into place, so a failure leaves no half-made study."""
    from img_guidance.outputs import check_writable

    # 1. Check inputs, before anything is written
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StudyError(f"{root} exists and is not a folder")
    if (root / DATABASE).exists():
        raise StudyError(f"{root} is already a study (it has {DATABASE}); choose another folder")
    if root.is_dir() and any(root.iterdir()):
        raise StudyError(f"{root} already holds files; a study goes into a new or empty folder")
    if not question.strip():
        raise StudyError("--question must not be empty")
    if not pairs:
        raise StudyError("a study needs at least one pair")
    if len(names) != 2 or names[0] == names[1]:
        raise StudyError(f"the two systems need two different names, got {names}")
    if sorted(set(checks)) != sorted(checks) or not all(0 <= c < len(pairs) for c in checks):
        raise StudyError(f"check pairs must be distinct indices into the {len(pairs)} pairs, got {checks}")
    for pair in pairs:
        for path in (pair.a, pair.b):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise StudyError(
                    f"{path}: a study shows PNG, JPEG and WebP images, not {path.suffix or 'none'}"
                )
    check_writable(root)

    # 2. Build the study beside its place
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a study is an ordinary folder
        (staging / IMAGES).mkdir()
        con = sqlite3.connect(staging / DATABASE, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")  # stored in the file: every later connection uses it
            con.executescript(SCHEMA)
            con.execute("BEGIN")
            settings = {
                "schema_version": SCHEMA_VERSION,
                "created_at": _now(),
                "seed": seed,
                "question": question.strip(),
                "a": names[0],
                "b": names[1],
                "sources": sources or {},
            }
            con.executemany(
                "INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in settings.items()]
            )
            image_ids: dict[str, int] = {}
            for i, pair in enumerate(pairs):
                ids = [_copy_image(con, path, staging / IMAGES, image_ids) for path in (pair.a, pair.b)]
                con.execute(
                    "INSERT INTO pairs (prompt, seed, a_image, b_image, is_check) VALUES (?, ?, ?, ?, ?)",
                    (pair.prompt, pair.seed, ids[0], ids[1], int(i in checks)),
                )
            con.execute("COMMIT")
        finally:
            con.close()
        # 3. Move into place (rename(2) replaces an empty folder)
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StudyStore(root)


def _copy_image(con: sqlite3.Connection, path: Path, dest: Path, known: dict[str, int]) -> int:
    """Copy one image into the study (once per content) and return its row id."""
    from PIL import Image, UnidentifiedImageError

    data = path.read_bytes()
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise StudyError(f"{path} does not decode as an image: {err}") from err
    suffix = ".jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()
    name = hashlib.sha1(data).hexdigest() + suffix
    if name not in known:
        (dest / name).write_bytes(data)
        known[name] = con.execute(
            "INSERT INTO images (file, source) VALUES (?, ?)", (name, str(path))
        ).lastrowid
    return known[name]


class StudyStore:
    """An existing study folder. Every method opens its own connection, so one store serves the web
    app's worker threads; ``invites_only`` makes every rater name an invite code."""

    def __init__(self, root: str | os.PathLike, *, invites_only: bool = False):
        self.root = Path(root)
        self.database = self.root / DATABASE
        self.invites_only = invites_only
        if not self.root.exists():
            raise FileNotFoundError(f"{self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a folder")
        if not self.database.is_file():
            raise StudyError(
                f"{self.root} is not a study folder (it has no {DATABASE}): "
                "make one with img-guidance study create"
            )
        try:
            with self._connect() as con:
                self.meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
                self.pair_count, self.check_count = con.execute(
                    "SELECT count(*), coalesce(sum(is_check), 0) FROM pairs"
                ).fetchone()
        except sqlite3.DatabaseError as err:
            raise StudyError(f"{self.database} is not a study database ({err})") from None
        version = self.meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StudyError(
                f"{self.database} has study schema version {version!r}; this img-guidance reads version "
                f"{SCHEMA_VERSION}"
            )

    # -- connections ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # mode=rw: opening never creates a database where there is none
        con = sqlite3.connect(
            f"{self.database.resolve().as_uri()}?mode=rw", uri=True, timeout=30, isolation_level=None
        )
        try:
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the vote is acknowledged
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on upgrade
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- settings ------------------------------------------------------------------------------

    @property
    def question(self) -> str:
        return self.meta["question"]

    @property
    def names(self) -> tuple[str, str]:
        """The names of system a and system b."""
        return (self.meta["a"], self.meta["b"])

    @property
    def trials_per_rater(self) -> int:
        return self.pair_count + self.check_count

    # -- raters --------------------------------------------------------------------------------

    def _check_invited(self, con: sqlite3.Connection, name: str) -> None:
        if (
            self.invites_only
            and con.execute("SELECT 1 FROM invites WHERE code = ?", (name,)).fetchone() is None
        ):
            raise NotInvited(f"{name!r} is not an invite code of this study")

    def check_invited(self, name: Any) -> None:
        """Raise NotInvited where the study requires invite codes and ``name`` is not one."""
        name = check_rater(name)
        with self._connect() as con:
            self._check_invited(con, name)

    def _rater(self, con: sqlite3.Connection, name: Any, *, create: bool) -> int:
        """The rater's id; with ``create``, a new rater gets their trials drawn and stored."""
        name = check_rater(name)
        self._check_invited(con, name)
        row = con.execute("SELECT id FROM raters WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return row[0]
        if not create:
            raise UnknownRater(f"rater {name!r} has no pairs yet: ask GET /api/next?rater=... first")
        pairs = con.execute("SELECT id, is_check FROM pairs ORDER BY id").fetchall()
        trials = rater_trials(
            [p for p, _ in pairs], [p for p, check in pairs if check], seed=self.meta["seed"], rater=name
        )
        rater = con.execute("INSERT INTO raters (name, created_at) VALUES (?, ?)", (name, _now())).lastrowid
        con.executemany(
            "INSERT INTO trials (rater, position, pair, a_left, repeat) VALUES (?, ?, ?, ?, ?)",
            [(rater, i, t.pair, int(t.a_left), int(t.repeat)) for i, t in enumerate(trials)],
        )
        return rater

    def _progress(self, con: sqlite3.Connection, rater: int) -> dict[str, int]:
        done, total = con.execute(
            """SELECT count(v.trial), count(*) FROM trials t LEFT JOIN votes v ON v.trial = t.id
               WHERE t.rater = ?""",
            (rater,),
        ).fetchone()
        return {"done": done, "total": total}

    def next_trial(self, rater: Any) -> dict[str, Any]:
        """The rater's first trial without a vote: ``{"pair": trial id, "left": image file, "right":
        image file, "prompt", "done", "total"}`` (``pair`` None when every trial has a vote). A new
        rater is registered, with their trials, on their first call."""
        name = check_rater(rater)
        with self._connect() as con:
            try:
                rater_id = self._rater(con, name, create=False)
            except UnknownRater:
                rater_id = None
        if rater_id is None:
            with self._write() as con:  # the check is repeated under the write lock
                rater_id = self._rater(con, name, create=True)
        with self._connect() as con:
            row = con.execute(
                """SELECT t.id, t.a_left, p.prompt, ia.file, ib.file
                   FROM trials t JOIN pairs p ON p.id = t.pair
                   JOIN images ia ON ia.id = p.a_image JOIN images ib ON ib.id = p.b_image
                   WHERE t.rater = ? AND t.id NOT IN (SELECT trial FROM votes)
                   ORDER BY t.position LIMIT 1""",
                (rater_id,),
            ).fetchone()
            progress = self._progress(con, rater_id)
        if row is None:
            return {"pair": None, "left": None, "right": None, "prompt": None, **progress}
        trial, a_left, prompt, file_a, file_b = row
        left, right = (file_a, file_b) if a_left else (file_b, file_a)
        return {"pair": trial, "left": left, "right": right, "prompt": prompt, **progress}

    def vote(self, rater: Any, pair: Any, choice: Any) -> dict[str, Any]:
        """Record the rater's ``choice`` (left, right or tie) on their trial ``pair``, replacing any
        earlier vote on it; committed before returning ``{"pair", "choice", "done", "total"}``."""
        choice = check_choice(choice)
        if isinstance(pair, bool) or not isinstance(pair, int):
            raise StudyError(f"pair must be an integer id, got {pair!r}")
        with self._write() as con:
            rater_id = self._rater(con, rater, create=False)
            row = con.execute(
                "SELECT a_left FROM trials WHERE id = ? AND rater = ?", (pair, rater_id)
            ).fetchone()
            if row is None:
                raise UnknownPair(f"pair {pair} is not one of the pairs of rater {check_rater(rater)!r}")
            at = _now()
            seq = con.execute(
                "INSERT INTO log (trial, action, choice, at) VALUES (?, 'vote', ?, ?)", (pair, choice, at)
            ).lastrowid
            con.execute(
                """INSERT INTO votes (trial, choice, outcome, seq, cast_at) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (trial) DO UPDATE SET
                   choice = excluded.choice, outcome = excluded.outcome, seq = excluded.seq,
                   cast_at = excluded.cast_at""",
                (pair, choice, outcome(choice, a_left=bool(row[0])), seq, at),
            )
            return {"pair": pair, "choice": choice, **self._progress(con, rater_id)}

    def undo(self, rater: Any) -> dict[str, Any]:
        """Remove the rater's most recent vote: ``{"undone": its trial id (None when there was none),
        "done", "total"}``."""
        with self._write() as con:
            rater_id = self._rater(con, rater, create=False)
            row = con.execute(
                """SELECT v.trial FROM votes v JOIN trials t ON t.id = v.trial
                   WHERE t.rater = ? ORDER BY v.seq DESC LIMIT 1""",
                (rater_id,),
            ).fetchone()
            if row is not None:
                con.execute("DELETE FROM votes WHERE trial = ?", row)
                con.execute("INSERT INTO log (trial, action, at) VALUES (?, 'undo', ?)", (row[0], _now()))
            return {"undone": row[0] if row else None, **self._progress(con, rater_id)}

    # -- invites -------------------------------------------------------------------------------

    def add_invites(self, count: int) -> list[str]:
        """``count`` new invite codes, stored in the database and appended to ``invites.txt``."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise StudyError(f"--count must be a positive integer, got {count!r}")
        with self._write() as con:
            taken = {code for (code,) in con.execute("SELECT code FROM invites")}
            codes: list[str] = []
            while len(codes) < count:
                code = "".join(secrets.choice(INVITE_ALPHABET) for _ in range(10))
                if code not in taken:
                    taken.add(code)
                    codes.append(code)
            at = _now()
            con.executemany("INSERT INTO invites VALUES (?, ?)", [(c, at) for c in codes])
        # the database is the record; the file is rewritten from it after the commit
        with self._connect() as con:
            every = [code for (code,) in con.execute("SELECT code FROM invites ORDER BY created_at, rowid")]
        tmp = self.root / f".{INVITES}.tmp"
        try:
            tmp.write_text("".join(c + "\n" for c in every), encoding="utf-8")
            os.replace(tmp, self.root / INVITES)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return codes

    def invite_count(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT count(*) FROM invites").fetchone()[0]

    # -- reading ---------------------------------------------------------------------------------

    def votes(self) -> list[Vote]:
        """Every vote, as the statistics read them."""
        with self._connect() as con:
            rows = con.execute(
                """SELECT r.name, t.pair, v.outcome, t.repeat FROM votes v
                   JOIN trials t ON t.id = v.trial JOIN raters r ON r.id = t.rater
                   ORDER BY r.id, t.position"""
            ).fetchall()
        return [Vote(rater=name, pair=pair, outcome=o, repeat=bool(repeat)) for name, pair, o, repeat in rows]

    def image_file(self, name: str) -> Path | None:
        """The path of a study image by its file name, or None where the study has no such image.
        The name is only looked up, never joined to a path before it is found."""
        with self._connect() as con:
            row = con.execute("SELECT file FROM images WHERE file = ?", (name,)).fetchone()
        return self.root / IMAGES / row[0] if row is not None else None

    def dump(self) -> list[str]:
        """The whole database as SQL statements (tests compare it before and after bad input)."""
        with self._connect() as con:
            return list(con.iterdump())
