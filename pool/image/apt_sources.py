"""The host's apt sources, read for a Debian mirror to debootstrap from.

The parsers are pure (text in, ``AptSource`` out); ``host_debian_mirror`` is the
only function here that reads files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from pool.image.files import read_text

# Release names and aliases that only the Debian archive serves; a host source whose
# suites include one of these (and component main) is a Debian mirror.
DEBIAN_SUITES = frozenset(
    {
        "buster",
        "bullseye",
        "bookworm",
        "trixie",
        "forky",
        "duke",
        "sid",
        "oldoldstable",
        "oldstable",
        "stable",
        "testing",
        "unstable",
    }
)


class AptSource(NamedTuple):
    """One enabled binary (``deb``) source: a deb822 stanza or a one-line entry."""

    uris: list[str]
    suites: list[str]
    components: list[str]


def host_debian_mirror(
    sources_list: Path = Path("/etc/apt/sources.list"),
    sources_dir: Path = Path("/etc/apt/sources.list.d"),
) -> str | None:
    """Return the first http(s) URI in the host's apt sources that serves the Debian
    main archive, or None (e.g. on Ubuntu, whose archive has no bookworm).

    Reads deb822 ``*.sources`` files in ``sources_dir`` and one-line ``deb`` entries
    in ``sources_list`` and ``sources_dir/*.list``; a missing file reads as empty.
    """
    sources: list[AptSource] = []
    if sources_dir.is_dir():
        for path in sorted(sources_dir.glob("*.sources")):
            sources.extend(parse_deb822(read_text(path)))
    list_files = [sources_list]
    if sources_dir.is_dir():
        list_files.extend(sorted(sources_dir.glob("*.list")))
    for path in list_files:
        sources.extend(parse_one_line(read_text(path)))
    return debian_mirror(sources)


def debian_mirror(sources: Iterable[AptSource]) -> str | None:
    """The first http(s) URI, without a trailing slash, of a source that serves a
    Debian suite with component main; None if there is none."""
    for uris, suites, components in sources:
        if "main" not in components or not DEBIAN_SUITES.intersection(suites):
            continue
        for uri in uris:
            if uri.startswith(("http://", "https://")):
                return uri.rstrip("/")
    return None


def parse_deb822(text: str) -> list[AptSource]:
    """Each enabled ``Types: deb`` stanza of a deb822 ``.sources`` file."""
    stanzas: list[dict[str, str]] = [{}]
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanzas[-1]:
                stanzas.append({})
            continue
        if line[0].isspace() and key:
            stanzas[-1][key] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        stanzas[-1][key] = value.strip()
    found = []
    for stanza in stanzas:
        if "deb" not in stanza.get("types", "").split():
            continue
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        found.append(
            AptSource(
                stanza.get("uris", "").split(),
                stanza.get("suites", "").split(),
                stanza.get("components", "").split(),
            )
        )
    return found


def parse_one_line(text: str) -> list[AptSource]:
    """Each ``deb [options] uri suite component...`` line of a ``.list`` file."""
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            found.append(AptSource([words[0]], [words[1]], words[2:]))
    return found
