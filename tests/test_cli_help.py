"""Every option of ``python -m spamkern`` explains itself in ``--help``."""

from __future__ import annotations

import argparse

from spamkern.cli import build_parser


def test_every_option_has_help_text():
    parser = build_parser()
    missing = [
        "/".join(action.option_strings)
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == [], f"options without help text: {missing}"
