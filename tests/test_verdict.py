"""The layers' shared vocabulary."""

import pytest

from kithmail.layers import Action, Layer, SmtpReply, Verdict


def test_a_verdict_carries_its_reason_and_reply() -> None:
    reply = SmtpReply(451, "4.7.1", "Greylisted, please retry in 60 seconds")
    v = Verdict(Layer.RECON, Action.DEFER, "recon.new_source", "first sight", reply)
    assert (v.layer, v.action, v.reason, str(v.reply)) == (
        "recon",
        "defer",
        "recon.new_source",
        "451 4.7.1 Greylisted, please retry in 60 seconds",
    )
    assert v.acts


def test_shadow_mode_records_but_does_not_act() -> None:
    v = Verdict(Layer.REPUTATION, Action.REJECT, "reputation.listed").in_shadow()
    assert (v.action, v.shadow, v.acts) == ("reject", True, False)
    assert not Verdict(Layer.RECON, Action.ACCEPT, "recon.known").acts


@pytest.mark.parametrize(
    ("code", "text"), [(199, "x"), (600, "x"), (250, "two\r\nlines"), (250, "bare\nlf")]
)
def test_a_reply_is_one_valid_line(code: int, text: str) -> None:
    with pytest.raises(ValueError, match="reply"):
        SmtpReply(code, "2.0.0", text)
