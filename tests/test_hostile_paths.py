"""A model or recipe path that is not a regular file -- a FIFO that would block the open, a device that never
ends -- is refused from its type, before anything reads it (one capped child: a hang ends at the timeout)."""

import os

from tests.hostile_harness import run_cli_each


def test_fifos_and_devices_named_as_models_or_recipes_are_refused_unread(tmp_path):
    os.mkfifo(tmp_path / "m.pt")
    os.mkfifo(tmp_path / "r.toml")
    (tmp_path / "zero.cpz").symlink_to("/dev/zero")
    cases = {
        "a FIFO as the model": (["report", tmp_path / "m.pt"], "FIFO"),
        "/dev/zero as the model": (["report", "/dev/zero"], "character device"),
        "a link to /dev/zero as the model": (["decode", tmp_path / "zero.cpz", "-o", tmp_path / "d.pt"], "zero.cpz"),
        "a FIFO as the recipe": (
            [
                "pipeline",
                "/dev/null",
                "--train-data",
                "digits",
                "-o",
                tmp_path / "o.cpz",
                "--recipe",
                tmp_path / "r.toml",
            ],
            "FIFO",
        ),
        "/dev/urandom as the recipe": (
            ["pipeline", "/dev/null", "--train-data", "digits", "-o", tmp_path / "o.cpz", "--recipe", "/dev/urandom"],
            "character device",
        ),
    }
    ended, child = run_cli_each([argv for argv, _ in cases.values()])
    for (what, (_, match)), e in zip(cases.items(), ended, strict=False):
        assert e.one_line_refusal and match in e.err and e.seconds < 5, (what, e)
    assert child.peak_mb < 800, child
