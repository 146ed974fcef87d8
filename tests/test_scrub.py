"""Scrubbing what an upstream echoes (issue 15, finding 9): a secret we sent must not come
back into a message in any form the upstream may have written it in — as sent, inside a
JSON string (escaped as Python, Java or JavaScript would, non-ASCII escaped or not), URL-
or form-encoded, or as the HTTP Basic value that carried it.
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vm_tokend.upstream import base as upstream

REDACTED = "[redacted]"
# Characters that JSON, URLs and forms each write in their own way.
TRICKY = '"\\/ +%&=:?#\x00\x01\x1b\x7f\n\t\r\u2028äé€\U0001f600ab1'


def printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)


def forms(secret: str) -> dict[str, str]:
    """Every way an upstream may write `secret` back, computed here on its own."""
    def upper_hex(ch: str) -> str:  # as Java's Jackson (Keycloak) escapes a character
        escaped = json.dumps(ch)[1:-1]
        return re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m[1].upper(), escaped)

    return {
        "raw": secret,
        "json": json.dumps(secret)[1:-1],
        "json-unicode": json.dumps(secret, ensure_ascii=False)[1:-1],
        "json-upper": "".join(upper_hex(ch) for ch in secret),
        "url": quote(secret, safe=""),
        "form": quote_plus(secret),
    }


def basic(client_id: str, secret: str) -> str:
    """The HTTP Basic value of a client secret (RFC 6749 2.3.1)."""
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return base64.b64encode(pair.encode()).decode()


def leaked(scrubbed: str, secrets: tuple[str, ...]) -> list[str]:
    """The forms of `secrets` found in `scrubbed` outside the [redacted] marks (the marks
    themselves are ours, not the upstream's: a secret like `d]` is not leaked by them)."""
    if scrubbed.endswith("…"):
        # a message cut to its limit may end in a mark cut short ("[redacte…"): ours too
        body = scrubbed[:-1]
        cut = next((k for k in range(len(REDACTED) - 1, 0, -1)
                    if body.endswith(REDACTED[:k])), 0)
        scrubbed = body[:len(body) - cut]
    found = []
    for piece in scrubbed.split(REDACTED):
        for secret in secrets:
            for name, form in forms(secret).items():
                if form in piece or printable(form) in piece:
                    found.append(f"{name} of {secret!r} in {piece!r}")
    return found


secret_text = st.one_of(st.text(alphabet=TRICKY, min_size=1, max_size=12),
                        st.text(min_size=1, max_size=12))
around = st.text(alphabet=TRICKY + "[]redact", max_size=12)


@settings(max_examples=400, deadline=None)
@given(secret=secret_text, how=st.sampled_from(sorted(forms("x"))), before=around,
       after=around)
def test_no_form_of_a_secret_survives_scrubbing(secret, how, before, after):
    echoed = forms(secret)[how]
    text = f"{before}{echoed}{after}"
    scrubbed = upstream.scrub(text, (secret,))
    assert not leaked(scrubbed, (secret,)), scrubbed
    assert REDACTED in scrubbed


@settings(max_examples=200, deadline=None)
@given(secret=secret_text, how=st.sampled_from(sorted(forms("x"))), before=around,
       after=around)
def test_no_form_of_a_client_secret_or_its_basic_value_survives(secret, how, before, after):
    value = basic("vm-token", secret)
    secrets = (secret, value)  # as the OIDC client hands them to scrub
    for echoed in (forms(secret)[how], forms(value)[how]):
        scrubbed = upstream.scrub(f"{before}{echoed}{after}", secrets)
        assert not leaked(scrubbed, secrets), scrubbed


@settings(max_examples=200, deadline=None)
@given(secret=secret_text, before=around, between=around, after=around)
@example(secret="[", before="1111111111[", between="1111111111[", after="11111111111[")
def test_every_echo_in_one_message_is_scrubbed(secret, before, between, after):
    text = before + between.join(forms(secret).values()) + after
    scrubbed = upstream.scrub(text[:upstream.MAX_MESSAGE], (secret,))
    assert not leaked(scrubbed, (secret,)), scrubbed


@pytest.mark.parametrize(("secret", "echo"), [
    ('hunter"2', '{"password":"hunter\\"2"}'),
    ("p\u00e4ss", '{"password":"p\\u00e4ss"}'),
    ("back\\slash", '{"password":"back\\\\slash"}'),
    ("tab\there", '{"password":"tab\\there"}'),
    ("esc\x1bape", '{"password":"esc\\u001Bape"}'),
])
def test_the_json_echoes_the_issue_names(secret, echo):
    scrubbed = upstream.scrub(f"bad request body: {echo}", (secret,))
    assert scrubbed == f'bad request body: {{"password":"{REDACTED}"}}'


def test_text_without_a_secret_is_kept():
    assert upstream.scrub("no such user\n(try again)", ("hunter2",)) == \
        "no such user (try again)"


def test_a_long_echo_shows_nothing_of_a_secret_cut_off_by_the_window():
    """Only the first SCRUB_WINDOW characters are read (a 4 MiB body echoing a secret all
    over must cost little); a secret that the window's end cuts in two shows nothing."""
    token = "t0k3n-" * 2000  # 12,000 characters, as a refresh token may be
    text = token * (upstream.SCRUB_WINDOW // len(token)) + token + " and more" * 100_000
    scrubbed = upstream.scrub(text, (token,))
    assert set(scrubbed.split(REDACTED)) <= {"", "…"}, scrubbed
    many = upstream.scrub("a" * upstream.MAX_RESPONSE, ("a",))
    assert many == REDACTED * 19 + "[redacted…"  # cut at MAX_MESSAGE, 200 characters
