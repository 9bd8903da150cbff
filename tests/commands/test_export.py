"""`finetune export`: the command's arguments refused as one line, before anything is written.
(The export itself, converter and Modelfile, is tests/test_export.py.)"""

import pytest

from finetune.cli import main


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    return err


def test_cli_bad_quant_is_one_line(tmp_path, capsys):
    from finetune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "model=tiny", "quant=q4_k_m", f"out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1 and "quant" in err



@pytest.mark.parametrize("args,says", [
    ([], "give exactly one of model=DIR (a model) or adapter=DIR"),
    (["model=tiny", "base=tiny"], "base= applies to adapter="),
    (["model=tiny", "name=a/b"], "name must be a plain file name stem, got 'a/b'"),
])
def test_cli_refusals_name_the_argument(tmp_path, capsys, args, says):
    assert says in _refused(["export", *args, f"out_dir={tmp_path / 'out'}"], capsys)
    assert not (tmp_path / "out").exists()
