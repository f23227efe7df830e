"""The CLI's --help texts: complete, with examples on their own lines, for the top level and every command."""

from __future__ import annotations

import pytest

from regretless.cli import COMMANDS, main


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def examples(text: str) -> list[str]:
    """The example command lines under 'examples:' (deeper-indented lines describe the one above)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lower() == "examples:")
    out = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):  # a blank or unindented line ends the block
            break
        if not line.startswith("      "):
            out.append(line)
    return out


def test_top_level_help_is_complete_and_lists_every_command(capsys):
    text = help_text(capsys, [])
    assert text.splitlines()[2].startswith("regretless: fine-tune language models with LoRA")
    ex = examples(text)
    assert len(ex) >= 4 and all(line.startswith("  regretless ") for line in ex)
    for name in COMMANDS:
        assert f"    {name} " in text or f"    {name}\n" in text
    assert "Exit status: 0 success, 2 a user error\n(one line on stderr), 3 a diverged run.\n" in text


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_examples_on_their_own_lines(name, capsys):
    text = help_text(capsys, [name])
    ex = examples(text)
    assert ex and all(line.startswith(f"  regretless {name}") or f"| regretless {name}" in line for line in ex), ex
    assert len({line.split("#")[0].strip() for line in ex}) == len(ex)  # one example a line, none run together


def test_bare_assets_lists(capsys):
    assert main(["assets"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cache: ") and "smollm2-135m" in out and "tiny-base" in out


def test_only_the_command_run_is_imported():
    """`regretless assets` and `regretless --help` start without torch: only the chosen command's module loads."""
    import subprocess
    import sys

    code = ("import sys\nfrom regretless.cli import main\nrc = main(['assets'])\n"
            "mods = sorted(m for m in sys.modules if m.startswith('regretless.commands.'))\n"
            "print(rc, 'torch' in sys.modules, mods)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.stdout.strip().splitlines()[-1] == "0 False ['regretless.commands.assets']", res.stdout + res.stderr
