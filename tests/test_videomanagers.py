"""The user's VideoManagers: lookup by id or name, the default and kept-warm ones, what the
configuration got wrong (notices), and bounded "unknown VideoManager" messages."""

from __future__ import annotations

import logging

import pytest

from vm_token.errors import UnknownVideoManager
from vm_tokend.keeper.videomanagers import VideoManagers
from vm_tokend.upstream.base import VideoManagerRef

MARKETING = VideoManagerRef("1001", "Marketing")
SALES = VideoManagerRef("1002", "Sales")
SUPPORT = VideoManagerRef("1003", "Support")
LISTED = (MARKETING, SALES, SUPPORT)


# -- lookup -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("ref", "found"), [
    ("1002", SALES), ("Sales", SALES), ("sales", SALES), ("SALES", SALES),
    ("Support", SUPPORT), ("1001", MARKETING),
    ("Sale", None), ("10", None), ("", None), (" Sales", None), ("1004", None),
])
def test_find_by_id_or_name_case_insensitively(ref, found):
    assert VideoManagers(LISTED).find(ref) == found


def test_unicode_names_fold_case():
    vms = VideoManagers([VideoManagerRef("7", "Straße"), VideoManagerRef("8", "ÉQUIPE")])
    assert vms.find("STRASSE") == VideoManagerRef("7", "Straße")
    assert vms.find("équipe") == VideoManagerRef("8", "ÉQUIPE")


def test_an_id_wins_over_a_name_that_looks_like_one():
    tricky = VideoManagerRef("2002", "1001")
    vms = VideoManagers([tricky, MARKETING])
    assert vms.find("1001") == MARKETING
    assert vms.find("2002") == tricky


def test_the_first_of_two_equal_names_wins():
    first, second = VideoManagerRef("1", "Sales"), VideoManagerRef("2", "sales")
    assert VideoManagers([first, second]).find("SALES") == first
    assert VideoManagers([second, first]).find("Sales") == second


def test_by_id_only_takes_ids():
    vms = VideoManagers(LISTED)
    assert vms.by_id("1003") == SUPPORT
    assert vms.by_id("Support") is None and vms.by_id(None) is None


# -- resolve ----------------------------------------------------------------------------------

def test_resolve_none_is_the_default():
    vms = VideoManagers(LISTED)
    with pytest.raises(UnknownVideoManager, match="^no default VideoManager: name one$"):
        vms.resolve(None)
    vms.pin("Sales", [], None)
    assert vms.resolve(None) == SALES
    assert vms.resolve("support") == SUPPORT


def test_resolve_unknown_names_the_known_ones():
    with pytest.raises(UnknownVideoManager) as info:
        VideoManagers(LISTED).resolve("Legal")
    assert str(info.value) == ("no VideoManager 'Legal' for this user; known: "
                               "Marketing (1001), Sales (1002), Support (1003)")


def test_resolve_in_an_empty_list():
    with pytest.raises(UnknownVideoManager, match="known: none$"):
        VideoManagers([]).resolve("Sales")


def test_resolve_names_ten_and_counts_the_rest():
    many = [VideoManagerRef(str(n), f"VM {n}") for n in range(1, 26)]
    with pytest.raises(UnknownVideoManager) as info:
        VideoManagers(many).resolve("nope")
    message = str(info.value)
    assert message.endswith("known: " + ", ".join(f"VM {n} ({n})" for n in range(1, 11))
                            + " and 15 more (`vm-token list`)")
    assert "VM 11" not in message


def test_resolve_messages_are_bounded_whatever_the_input():
    # the longest names the API may send (upstream.MAX_NAME), ids (MAX_ID), many of them
    many = [VideoManagerRef(f"{n:064d}", "N" * 200) for n in range(5000)]
    ref = "x" * 100_000 + "\n\x00"
    with pytest.raises(UnknownVideoManager) as info:
        VideoManagers(many).resolve(ref)
    message = str(info.value)
    assert len(message) < 10 * (200 + 64 + 5) + 300
    assert "x" * 101 not in message and "\n" not in message and "\x00" not in message
    assert message.endswith("and 4990 more (`vm-token list`)")


def test_a_control_character_in_a_ref_is_escaped():
    with pytest.raises(UnknownVideoManager) as info:
        VideoManagers(LISTED).resolve("Sales\x1b[2J")
    assert "\x1b" not in str(info.value) and "'Sales\\x1b[2J'" in str(info.value)


# -- pin --------------------------------------------------------------------------------------

def test_pin_the_configured_default_and_kept_warm_ones():
    vms = VideoManagers(LISTED)
    vms.pin("sales", ["1003", "Marketing", "Sales"], "1001")
    assert vms.default == SALES  # configured beats the login's VideoManager
    assert vms.pinned == {"1001", "1002", "1003"}
    assert vms.notices == []


def test_pin_falls_back_to_the_login_videomanager():
    vms = VideoManagers(LISTED)
    vms.pin(None, [], "1003")
    assert vms.default == SUPPORT and vms.pinned == {"1003"} and vms.notices == []


def test_pin_without_default_or_fallback_takes_the_first_listed():
    vms = VideoManagers(LISTED)
    vms.pin(None, [], None)  # OIDC: no login VideoManager
    assert vms.default == MARKETING and vms.pinned == {"1001"} and vms.notices == []


def test_pin_unknown_default_says_so_and_uses_the_fallback(caplog):
    vms = VideoManagers(LISTED)
    with caplog.at_level(logging.WARNING, logger="vm_tokend.keeper"):
        vms.pin("Legal", [], "1002")
    assert vms.default == SALES
    assert vms.notices == ["default_videomanager 'Legal' is not one of this user's "
                           "VideoManagers"]
    assert [r.getMessage() for r in caplog.records] == vms.notices


def test_pin_unknown_default_and_no_fallback_takes_the_first_listed():
    vms = VideoManagers(LISTED)
    vms.pin("Legal", [], None)
    assert vms.default == MARKETING
    assert vms.notices == ["default_videomanager 'Legal' is not one of this user's "
                           "VideoManagers"]


def test_pin_login_videomanager_missing_from_the_list():
    vms = VideoManagers(LISTED)
    vms.pin(None, [], "9999")
    assert vms.default == MARKETING
    assert vms.notices == ["the API's login answer named VideoManager '9999', which is not "
                           "in the user's list; the default is the first listed, "
                           "Marketing (1001)"]


def test_pin_unknown_kept_warm_ones_are_named():
    vms = VideoManagers(LISTED)
    vms.pin(None, ["Sales", "Legal", "1009"], "1001")
    assert vms.pinned == {"1001", "1002"}
    assert vms.notices == [
        "videomanagers: 'Legal' is not one of this user's VideoManagers",
        "videomanagers: '1009' is not one of this user's VideoManagers",
    ]


def test_pin_in_an_empty_list():
    vms = VideoManagers([])
    vms.pin(None, [], None)
    assert vms.default is None and vms.pinned == set()
    with pytest.raises(UnknownVideoManager, match="no default"):
        vms.resolve(None)


def test_notices_are_logged_once_and_follow_the_configuration(caplog):
    vms = VideoManagers(LISTED)
    with caplog.at_level(logging.WARNING, logger="vm_tokend.keeper"):
        vms.pin("Legal", ["Ops"], None)
        vms.pin("Legal", ["Ops"], None)  # a relist or a reload with the same configuration
    assert len(caplog.records) == 2
    assert len(vms.notices) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vm_tokend.keeper"):
        vms.pin("Sales", [], None)  # fixed
    assert vms.notices == [] and vms.default == SALES
    assert caplog.records == []


def test_notices_quote_and_bound_what_the_user_configured():
    vms = VideoManagers(LISTED)
    vms.pin("L" * 10_000, ["\x1b]0;title\x07"], None)
    assert all(len(notice) < 250 for notice in vms.notices)
    assert all("\x1b" not in notice and "\x07" not in notice for notice in vms.notices)
