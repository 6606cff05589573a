"""The server's settings refuse values that cannot work, before anything starts."""
from __future__ import annotations

import math

import pytest

from service.cli import main
from service.config import MAX_CALL_TIMEOUT_S, Settings


@pytest.mark.parametrize("field, value", [
    ("call_timeout_s", 0.0), ("call_timeout_s", -1.0), ("call_timeout_s", math.inf), ("call_timeout_s", math.nan),
    ("call_timeout_s", MAX_CALL_TIMEOUT_S * 2), ("grace_s", -0.5), ("grace_s", math.inf), ("grace_s", math.nan),
    ("workers", 0), ("port", 65536), ("metrics_port", -1), ("log_format", "xml"), ("max_shards", 0),
    ("max_data_bytes", -1), ("tls_cert", "only-the-cert.pem"), ("placement_timeout_s", 0.0),
    ("placement_timeout_s", math.inf), ("placement_timeout_s", math.nan),
])
def test_a_setting_that_cannot_work_is_refused(field, value):
    with pytest.raises(ValueError):
        Settings(**{field: value})


def test_the_longest_allowed_wait_is_accepted():
    s = Settings(call_timeout_s=MAX_CALL_TIMEOUT_S, grace_s=MAX_CALL_TIMEOUT_S)
    assert s.call_timeout_s == MAX_CALL_TIMEOUT_S and Settings().call_timeout_s == 600.0


def test_serve_with_an_infinite_call_timeout_says_why_and_exits_2(capsys):
    assert main(["serve", "--port", "0", "--call-timeout-s", "inf"]) == 2
    err = capsys.readouterr().err
    assert "error: call_timeout_s in (0, 1e+06]" in err and "got inf" in err


def test_the_placement_timeout_is_a_flag_and_a_variable(monkeypatch):
    import argparse

    from service.config import add_flags, from_args

    def parsed(*argv):
        parser = argparse.ArgumentParser()
        add_flags(parser)
        return from_args(parser.parse_args(argv))
    assert parsed().placement_timeout_s == 30.0
    assert parsed("--placement-timeout-s", "120").placement_timeout_s == 120.0
    monkeypatch.setenv("GRADSHARD_PLACEMENT_TIMEOUT_S", "90")
    assert parsed().placement_timeout_s == 90.0
