"""The apt-sources parsers, fed text: no file and no host needed."""

from __future__ import annotations

from pool.image.apt_sources import AptSource, debian_mirror, parse_deb822, parse_one_line


def test_deb822_stanzas_are_split_on_blank_lines_and_keys_are_case_insensitive() -> None:
    text = """\
Types: deb
URIs: http://one.example/debian
Suites: bookworm bookworm-updates
Components: main

types: deb
uris: http://two.example/debian
suites: trixie
components: main contrib
"""

    assert parse_deb822(text) == [
        AptSource(["http://one.example/debian"], ["bookworm", "bookworm-updates"], ["main"]),
        AptSource(["http://two.example/debian"], ["trixie"], ["main", "contrib"]),
    ]


def test_deb822_continuation_lines_extend_the_field_and_comments_do_not() -> None:
    text = """\
Types: deb
URIs: http://one.example/debian
# http://commented.example/debian
  http://two.example/debian
Suites: bookworm
Components: main
"""

    (source,) = parse_deb822(text)

    assert source.uris == ["http://one.example/debian", "http://two.example/debian"]


def test_deb822_skips_source_only_and_disabled_stanzas() -> None:
    text = """\
Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: NO

Types: deb-src deb
URIs: http://on.example/debian
Suites: bookworm
Components: main
"""

    assert [source.uris for source in parse_deb822(text)] == [["http://on.example/debian"]]


def test_one_line_entries_drop_options_comments_and_deb_src() -> None:
    text = """\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://a.example/debian bookworm main
deb http://b.example/debian trixie main contrib # trailing comment
deb [trusted=yes] http://c.example/debian
"""

    assert parse_one_line(text) == [
        AptSource(["http://a.example/debian"], ["bookworm"], ["main"]),
        AptSource(["http://b.example/debian"], ["trixie"], ["main", "contrib"]),
    ]


def test_empty_text_has_no_sources() -> None:
    assert parse_deb822("") == []
    assert parse_one_line("") == []


def test_mirror_needs_a_debian_suite_main_and_http() -> None:
    sources = [
        AptSource(["http://security.example/debian-security"], ["bookworm-security"], ["main"]),
        AptSource(["http://contrib.example/debian"], ["bookworm"], ["contrib"]),
        AptSource(["file:/srv/mirror", "https://mirror.example/debian/"], ["stable"], ["main"]),
        AptSource(["http://later.example/debian"], ["bookworm"], ["main"]),
    ]

    assert debian_mirror(sources) == "https://mirror.example/debian"


def test_ubuntu_suites_are_not_a_debian_mirror() -> None:
    sources = [AptSource(["http://archive.ubuntu.com/ubuntu"], ["noble", "jammy"], ["main"])]

    assert debian_mirror(sources) is None
