"""``autoglm validate FILE...``: one line per file (``valid``, or each error naming its field,
every error at once), exit status 1 if any file is invalid, and never a traceback."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from autoglm import cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
TINY = EXAMPLE.read_text()


def validate(capsys: pytest.CaptureFixture[str], *files: Path | str) -> tuple[int, list[str]]:
    rc = cli.main(["validate", *map(str, files)])
    out, err = capsys.readouterr()
    assert err == ""
    return rc, out.splitlines()


def write(tmp_path: Path, name: str, text: str) -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def test_a_valid_file_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert validate(capsys, EXAMPLE) == (0, [f"{EXAMPLE}: valid"])


def test_each_error_names_its_field_all_at_once(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "bad.yaml", TINY.replace("name: tiny\n", "name: Tiny\n")
              .replace("topK: 2", "topK: 0").replace("repository: /models", "repository: m")
              .replace("maxReplicas: 3", "maxReplicas: 3\n    replicas: 2"))
    rc, lines = validate(capsys, f)
    assert rc == 1
    assert [line.split(": ")[1] for line in lines] == [
        "metadata.name", "spec.model.repository", "spec.model.topK", "spec.experts.replicas"]
    assert all(line.startswith(f"{f}: ") for line in lines)
    assert "RFC 1123 subdomain" in lines[0], "the name as the API server checks it"


@pytest.mark.parametrize(("text", "says"), [
    ("a: [1\n", "not valid YAML: line 2, column 1: expected ',' or ']'"),
    ("kind: x\nkind: y\n", "not valid YAML: line 2, column 1: found duplicate key 'kind'"),
    ("x: &a [*a]\n", "not valid YAML: line 1, column 4: found unconstructable recursive node"),
    ("[" * 3000, "not valid YAML: nested too deeply"),
    ("- 1\n- 2\n", "not a mapping but a list: expected an AutoGLMDeployment"),
    ("just text\n", "not a mapping but a string: expected an AutoGLMDeployment"),
    ("", "empty: no document"),
    ("---\n---\n# nothing\n", "empty: no document"),
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n", "no AutoGLMDeployment in this file"),
    ("metadata: {name: x}\n", "kind: required (expected AutoGLMDeployment)"),
    ("apiVersion: autoglm.io/v1alpha1\nkind: AutoGLMDeployment\n",
     "metadata.name: required (name or generateName)"),
])
def test_what_is_not_a_resource_is_said_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str) -> None:
    f = write(tmp_path, "x.yaml", text)
    rc, lines = validate(capsys, f)
    assert rc == 1
    assert lines[0].startswith(f"{f}: {says}"), lines


def test_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines = validate(capsys, tmp_path / "missing.yaml", tmp_path, EXAMPLE)
    assert rc == 1
    assert lines == [f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory",
                     f"{tmp_path}: cannot read: Is a directory", f"{EXAMPLE}: valid"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\x00\xfe garbage")
    rc, lines = validate(capsys, binary)
    assert rc == 1 and lines[0].startswith(f"{binary}: not valid YAML")


def test_every_document_of_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = TINY.replace("name: tiny\n", "name: other\n").replace("version: 1", "version: x")
    ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: models}\n"
    f = write(tmp_path, "all.yaml", f"{ns}---\n{TINY}---\n{other}---\n---\n7\n---\na: [")
    rc, lines = validate(capsys, f)
    assert rc == 1
    assert lines == [f"{f}: document 3: spec.model.version: must be an integer",
                     f"{f}: document 5: not a mapping but a number: expected an "
                     "AutoGLMDeployment",
                     f"{f}: not valid YAML: line 82, column 5: expected the node content, "
                     "but found '<stream end>'"]
    good = write(tmp_path, "good.yaml", f"{ns}---\n{TINY}---\n"
                 + TINY.replace("name: tiny\n", "name: two\n"))
    assert validate(capsys, good) == (0, [f"{good}: valid"])


def test_a_kubectl_list_and_yaml_as_kubectl_reads_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    doc = yaml.safe_load(TINY)
    doc["spec"]["triton"]["image"] = "registry/triton:2024-06-01"
    doc["spec"]["model"]["version"] = 2.0  # kubectl sends it as 2
    f = write(tmp_path, "list.yaml", yaml.safe_dump(
        {"apiVersion": "v1", "kind": "List", "items": [doc, {**doc, "metadata": {}}]}))
    # an unquoted date stays a string (kubectl reads YAML so), not a date
    f.write_text(f.read_text().replace("'registry/triton:2024-06-01'",
                                       "registry/triton:2024-06-01"))
    rc, lines = validate(capsys, f)
    assert (rc, lines) == (1, [f"{f}: items[1]: metadata.name: required (name or "
                               "generateName)"])
    date = write(tmp_path, "date.yaml", TINY.replace("name: tiny-moe", "name: 2024-06-01"))
    assert validate(capsys, date) == (0, [f"{date}: valid"])


def test_standard_input(capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TINY.encode())))
    assert validate(capsys, "-") == (0, ["-: valid"])


def test_the_command_never_prints_a_traceback(tmp_path: Path) -> None:
    f = write(tmp_path, "x.yaml", "a: [1\n")
    proc = subprocess.run([sys.executable, "-m", "autoglm.cli", "validate", str(f),
                           str(tmp_path / "missing.yaml"), str(EXAMPLE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 3
