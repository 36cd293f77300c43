"""Real text in many languages with no download: the translation catalogs that ship inside Django.

Multilingual distillation needs a corpus per language, and its tests need one that is on disk. The
Python standard library carries no translations, and nothing the core dependencies install carries
sentences in other languages. Django (BSD licence, one wheel, pure Python) ships the compiled gettext
catalogs (``.mo``) of its user interface for about 100 languages: validation messages, admin pages,
password help, humanised dates and numbers ("Enter a valid email address.", "Bitte gültige
E-Mail-Adresse eingeben."). They are real sentences written by translators, and they are *parallel*: every
translated message has its English original (the catalog's ``msgid``). Install it with
``pip install 'tadistill[multilingual]'`` (the test extra includes it).

**What is read.** Every ``django/**/locale/<lang>/LC_MESSAGES/*.mo`` file of the installed Django
(``django.mo`` and ``djangojs.mo``), with the small reader below (the GNU ``.mo`` layout: a header of
offsets, then length/offset tables of originals and translations). The header entry, untranslated
messages and messages whose English original has no letters are skipped. Of a plural message the
first form is kept; a context (``msgctxt``) is dropped.

**Cleaning.** Format placeholders (``%(name)s``, ``%s``, ``{fields}``) and HTML tags are removed,
quote pairs left empty by that (“”, „“, «») are dropped, and whitespace is collapsed. What remains is
the text; English texts are the cleaned originals. Each language's texts are deduplicated and sorted
by (area, English original), so the corpus is deterministic for a given Django version.

**Size.** With Django 5.2, about 900 messages and 3,700 English words per fully translated language
(de, fr, es, ru, ja, zh_Hans, ar); fewer for partly translated ones (sw: 645). This is a small
corpus: enough for tests and a first look at a multilingual study, not for a real distillation run.

**The area of a message** is the Django component whose catalog holds it: ``admin``, ``admindocs``,
``auth``, ``core`` (forms, validators, dates, pagination) and ``other`` (contenttypes, flatpages, gis,
humanize, postgres, redirects, sessions, sites, grouped because each has 6-20 messages of two words or more). It labels
the built-in cross-lingual task ``l10n-topic`` (:mod:`tadistill.evaluation.crosslingual`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tadistill.errors import ConfigError, DataError, did_you_mean

CATALOG_PACKAGE = "django"
INSTALL_HINT = "pip install 'tadistill[multilingual]' (it installs Django, whose translation catalogs are the corpus)"
ENGLISH = "en"  # the catalogs' originals
# Django component (the folder above locale/) -> area label; components not named here go to "other".
AREAS = {"admin": "admin", "admindocs": "admindocs", "auth": "auth", "conf": "core"}
OTHER_AREA = "other"
MO_MAGIC = 0x950412DE  # GNU gettext .mo magic number, in the file's byte order
EVAL_PERCENT = 20  # l10n-topic: the share of English originals held out for evaluation

_PLACEHOLDER = re.compile(r"%\([^)]*\)[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]|%[-#0 +]*\d*(?:\.\d+)?[sdifrxX]|\{[^{}]*\}")
_TAG = re.compile(r"<[^<>]+>")
_EMPTY_QUOTES = re.compile(r"“\s*”|„\s*“|«\s*»|‘\s*’|\"\s*\"|'\s*'|「\s*」|『\s*』|\(\s*\)|”\s*”|»\s*«")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_COMMAS = re.compile(r"([,;])(?:\s*[,;])+")  # "e.g. , , , and" once its placeholders are gone


@dataclass(frozen=True)
class Message:
    """One translated message: its area, its cleaned English original (``key``) and its cleaned text."""

    area: str
    key: str
    text: str


# ----------------------------------------------------------------------------------------------------
# Reading the catalogs
# ----------------------------------------------------------------------------------------------------


def read_mo(path: str | Path) -> dict[str, str]:
    """``{msgid: msgstr}`` of a GNU gettext ``.mo`` file (raw strings: context and plural forms kept).

    Raises DataError (one line) when the file is not a readable .mo catalog.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        order = "<" if struct.unpack("<I", data[:4])[0] == MO_MAGIC else ">"
        magic, _revision, count, originals, translations = struct.unpack(order + "5I", data[:20])
        if magic != MO_MAGIC:
            raise ValueError("bad magic number")
        catalog = {}
        for i in range(count):
            n_id, at_id = struct.unpack(order + "2I", data[originals + 8 * i : originals + 8 * i + 8])
            n_str, at_str = struct.unpack(order + "2I", data[translations + 8 * i : translations + 8 * i + 8])
            if at_id + n_id > len(data) or at_str + n_str > len(data):
                raise ValueError("string past the end of the file")
            catalog[data[at_id : at_id + n_id].decode("utf-8")] = data[at_str : at_str + n_str].decode("utf-8")
        return catalog
    except (OSError, struct.error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise DataError(f"translation catalog {path} could not be read ({type(exc).__name__}): reinstall Django") from None


def clean_message(raw: str) -> str:
    """One catalog string as plain text: first plural form, no context, placeholders or tags."""
    text = raw.split("\x00", 1)[0]  # plural forms are NUL-separated: keep the first
    text = text.rsplit("\x04", 1)[-1]  # "context EOT message": drop the context
    text = _TAG.sub(" ", _PLACEHOLDER.sub(" ", text.replace("%%", "%")))
    text = _SPACE.sub(" ", _EMPTY_QUOTES.sub(" ", text))
    text = _REPEATED_COMMAS.sub(r"\1", _SPACE_BEFORE_PUNCT.sub(r"\1", text))
    return text.strip(" :-–—,;")


def _has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def _package_root() -> Path:
    try:
        import django
    except ImportError:
        raise DataError(f"the multilingual built-in corpus needs Django's translation catalogs: {INSTALL_HINT}") from None
    return Path(django.__file__).parent


@functools.lru_cache(maxsize=1)
def _catalog_files() -> dict[str, tuple[tuple[str, Path], ...]]:
    """language -> ((area, .mo path), ...) of the installed Django, in sorted path order."""
    root = _package_root()
    found: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(root.rglob("locale/*/LC_MESSAGES/*.mo")):
        language = path.parts[-3]
        component = path.parts[-5]  # .../<component>/locale/<lang>/LC_MESSAGES/x.mo
        found.setdefault(language, []).append((AREAS.get(component, OTHER_AREA), path))
    if not found:
        raise DataError(f"no translation catalogs found under {root}: {INSTALL_HINT}")
    return {lang: tuple(files) for lang, files in found.items()}


def available_languages() -> tuple[str, ...]:
    """Codes of the languages with catalogs (Django's spelling: ``de``, ``pt_BR``, ``zh_Hans``), and ``en``."""
    return tuple(sorted({ENGLISH, *_catalog_files()}))


def normalize_language(language: str) -> str:
    """A user's language code in Django's spelling (``zh-hans`` -> ``zh_Hans``); ConfigError when unknown."""
    wanted = str(language).strip().replace("-", "_").lower()
    for code in available_languages():
        if code.lower() == wanted:
            return code
    raise ConfigError(f"language {language!r} has no built-in multilingual corpus"
                      f"{did_you_mean(wanted, [c.lower() for c in available_languages()])}: use one of "
                      f"{', '.join(available_languages())}")


@functools.cache
def multilingual_messages(language: str) -> tuple[Message, ...]:
    """Every translated message of ``language`` (``en``: every original), cleaned, sorted by (area, key).

    A message whose English original or text is left with no letter by the cleaning is dropped, and so
    is a second message with the same (area, key). Raises ConfigError for an unknown language and
    DataError when Django is not installed or a language has no message left.
    """
    language = normalize_language(language)
    catalogs = _catalog_files()
    sources = [item for files in catalogs.values() for item in files] if language == ENGLISH else catalogs[language]
    messages: dict[tuple[str, str], str] = {}
    for area, path in sources:
        for raw_id, raw_text in read_mo(path).items():
            if not raw_id or not raw_text:  # the header entry; an untranslated message
                continue
            key = clean_message(raw_id)
            text = key if language == ENGLISH else clean_message(raw_text)
            if _has_letters(key) and _has_letters(text):
                messages.setdefault((area, key), text)
    if not messages:
        raise DataError(f"language {language!r} has no translated message in Django's catalogs: pick another language")
    return tuple(Message(area, key, text) for (area, key), text in sorted(messages.items()))


def multilingual_texts(language: str) -> list[str]:
    """The corpus of one language: its messages' texts, deduplicated, in (area, key) order."""
    return list(dict.fromkeys(m.text for m in multilingual_messages(language)))


def write_multilingual_corpus(folder: str | Path, languages: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """Write ``<folder>/<lang>.txt`` per language (texts separated by blank lines, the .txt corpus format).

    Returns ``{language: path}`` in the order given, ready for ``data.source`` entries or a study's
    ``languages:``. Raises ConfigError for an empty or repeated list, or an unknown language.
    """
    if not languages:
        raise ConfigError("give at least one language for the multilingual corpus, e.g. ['en', 'de', 'fr']")
    codes = [normalize_language(lang) for lang in languages]
    if len(set(codes)) != len(codes):
        raise ConfigError(f"languages {list(languages)} name one language twice: list each once")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for code in codes:
        path = folder / f"{code}.txt"
        path.write_text("\n\n".join(multilingual_texts(code)) + "\n", encoding="utf-8")
        paths[code] = path
    return paths


# ----------------------------------------------------------------------------------------------------
# The cross-lingual topic task: which Django component a message belongs to
# ----------------------------------------------------------------------------------------------------


def topic_split(key: str) -> str:
    """"train" or "eval" from a stable hash of the English original: every language splits alike."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


def topic_rows(language: str, *, min_words: int = 2) -> dict[str, list[tuple[str, str]]]:
    """``{"train": [(text, area), ...], "eval": [...]}`` of ``language`` for the l10n-topic task.

    A message is kept when its English original has at least ``min_words`` words, so every language
    holds translations of one set of originals (one-word messages, "January", "Save", carry little of
    their area). The split follows the English original (:func:`topic_split`): a model trained on one
    language's train rows never sees a translation of the evaluated messages.
    """
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
    for m in multilingual_messages(language):
        if len(m.key.split()) >= min_words:
            rows[topic_split(m.key)].append((m.text, m.area))
    return rows
