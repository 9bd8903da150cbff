"""`finetune chat` on the command line: piped stdin, and its refusals in one line."""

import subprocess
import sys

import pytest

from finetune.cli import main


def test_piped_stdin_through_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "finetune", "chat", "model=tiny", "temperature=0", "max_new_tokens=4",
                        "device=cpu"], input="hello\n/reset\nbye\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "(conversation reset)" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,says", [
    ([], "give exactly one of adapter=DIR (on its base) or model=DIR|ALIAS"),
    (["model=tiny", "adapter=x"], "give exactly one of adapter=DIR"),
    (["model=tiny", "base=tiny"], "base= applies to adapter="),
    (["adapter=/nonexistent/a"], "adapter directory not found: /nonexistent/a"),
    (["model=tiny", "temperature=-1"], "temperature"),
    (["model=tiny", "top_p=0"], "top_p"),
])
def test_refusals_are_one_line(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1 and says in err, err
