"""git's credential format: the parser, by example and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vm_token._git_credential import (
    MAX_LINE,
    CredentialInputError,
    format_answer,
    parse,
    videomanager_from_path,
)


def test_attributes_up_to_a_blank_line():
    credential = parse(b"protocol=https\nhost=api.video-cdn.net\npath=v1/vms/42/videos\n"
                       b"username=Sales\n\nhost=ignored.example\n")
    assert credential.get("protocol") == "https"
    assert credential.get("host") == "api.video-cdn.net"
    assert credential.get("path") == "v1/vms/42/videos"
    assert credential.get("username") == "Sales"


def test_eof_ends_too_and_crlf_is_a_line_end():
    credential = parse(b"protocol=https\r\nhost=example.com:8443")
    assert credential.get("protocol") == "https"
    assert credential.get("host") == "example.com:8443"


def test_values_are_taken_as_they_are():
    credential = parse(b"password=a=b c\"d'\\e\n")
    assert credential.get("password") == "a=b c\"d'\\e"


def test_lists_append_and_an_empty_value_clears():
    credential = parse(b"capability[]=authtype\ncapability[]=state\n")
    assert credential.lists["capability[]"] == ["authtype", "state"]
    assert credential.has_capability("authtype")
    credential = parse(b"capability[]=authtype\ncapability[]=\ncapability[]=state\n")
    assert credential.lists["capability[]"] == ["state"]
    assert not credential.has_capability("authtype")


def test_last_value_wins_and_unknown_keys_are_kept_out_of_the_way():
    credential = parse(b"host=a\nhost=b\nwwwauth[]=Bearer realm=x\nfuture_key=1\n")
    assert credential.get("host") == "b"
    assert credential.get("protocol") is None


def test_url_stands_for_its_parts():
    credential = parse(b"url=https://Sales@api.video-cdn.net/v1/vms/7/videos\n")
    assert credential.get("protocol") == "https"
    assert credential.get("host") == "api.video-cdn.net"
    assert credential.get("username") == "Sales"
    assert credential.get("path") == "v1/vms/7/videos"


@pytest.mark.parametrize("data", [
    b"no equals sign\n", b"=value\n", b"host=a\0b\n", b"url=no-scheme\n",
    b"k=" + b"x" * MAX_LINE + b"\n",
])
def test_unreadable_input(data):
    with pytest.raises(CredentialInputError):
        parse(data)


def test_longest_line_allowed():
    value = "x" * (MAX_LINE - len("k=") - 1)
    assert parse(f"k={value}\n".encode()).get("k") == value


def test_repr_never_shows_secrets():
    credential = parse(b"password=hunter2\ncredential=tok\n")
    assert "hunter2" not in repr(credential) and "tok" not in repr(credential)


@pytest.mark.parametrize(("path", "vm"), [
    ("v1/vms/1234/videos", "1234"), ("vms/99", "99"), ("/v1/vms/5?x=1", "5"),
    ("v1/vms", None), ("v1/other/3", None), (None, None), ("", None),
])
def test_videomanager_from_path(path, vm):
    assert videomanager_from_path(path) == vm


def test_answers_never_carry_a_newline():
    assert format_answer([("password", "t")]) == "password=t\n"
    with pytest.raises(CredentialInputError):
        format_answer([("password", "t\nhost=evil")])


@given(st.binary(max_size=2048))
def test_parser_never_fails_otherwise(data):
    try:
        credential = parse(data)
    except CredentialInputError:
        return
    # Whatever it accepts can be sent on: text that encodes as UTF-8 (no surrogates).
    for text in [*credential.values.items(), *credential.lists.items()]:
        for item in (text[0], *([text[1]] if isinstance(text[1], str) else text[1])):
            item.encode("utf-8")


def test_input_that_is_not_utf8_is_refused_without_echoing_it():
    for data in (b"host=\xff\n", b"username=\xc3\x28\n", b"password=hunter2\x80\n",
                 b"protocol=https\nwwwauth[]=Basic \xe9\n"):
        with pytest.raises(CredentialInputError, match="line [12] is not valid UTF-8") as info:
            parse(data)
        assert "hunter2" not in str(info.value)


keys = st.text(st.characters(blacklist_characters="=\n\r\0[]", codec="utf-8"),
               min_size=1, max_size=20).filter(lambda k: k != "url")
values = st.text(st.characters(blacklist_characters="\n\r\0", codec="utf-8"),
                 min_size=1, max_size=50)


@given(st.dictionaries(keys, values, max_size=10))
def test_what_we_format_parses_back(attributes):
    assert parse(format_answer(attributes.items()).encode()).values == attributes
