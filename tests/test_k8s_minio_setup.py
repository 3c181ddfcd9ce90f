"""Kubernetes manifests (k8s/): the MinIO setup Job's script. The minio/mc image has a POSIX shell and mc,
nothing else: a small sh tokenizer finds every command word the script runs, and the script runs under
/bin/sh with only a stand-in `mc` on the PATH.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.k8s_support import RENDERED, container_env, containers, one, pod_templates, requires_kubectl

pytestmark = requires_kubectl


# Built into every POSIX sh (dash, bash, busybox ash): the special built-ins and the usual regular ones.
SH_BUILTINS = {
    ":", ".", "break", "continue", "eval", "exec", "exit", "export", "readonly", "return", "set", "shift", "times",
    "trap", "unset", "echo", "printf", "test", "[", "read", "cd", "pwd", "true", "false", "command", "wait",
    "umask", "getopts", "kill", "type", "hash", "alias", "unalias", "jobs", "fg", "bg",
}
SH_RESERVED_OPENERS = {"if", "then", "else", "elif", "do", "while", "until", "!", "{"}
SH_RESERVED_CLOSERS = {"fi", "done", "}"}
_OPERATORS = ["&&", "||", ";;", ">>", ">&", "<&", "<<", ";", "&", "|", "(", ")", "<", ">"]
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _sh_tokens(script: str, commands: list[str]) -> list[tuple[str, str]]:
    """Words and operators of a shell script, quotes respected; the command words of $(...) substitutions
    go to `commands` directly. Refuses what it does not model (heredocs, backticks, $(( )), $() inside
    double quotes) rather than guess."""
    tokens: list[tuple[str, str]] = []
    word, in_word, i, n = "", False, 0, len(script)

    def end_word() -> None:
        nonlocal word, in_word
        if in_word:
            tokens.append(("word", word))
        word, in_word = "", False

    while i < n:
        c = script[i]
        if c == "\\" and i + 1 < n:
            if script[i + 1] != "\n":
                word, in_word = word + script[i + 1], True
            i += 2
        elif c == "'":
            j = script.index("'", i + 1)
            word, in_word, i = word + script[i + 1:j], True, j + 1
        elif c == '"':
            j = i + 1
            while script[j] != '"':
                assert script[j] != "`" and script[j:j + 2] != "$(", "keep command substitutions out of double quotes"
                j += 2 if script[j] == "\\" else 1
            word, in_word, i = word + script[i + 1:j], True, j + 1
        elif c == "`":
            raise AssertionError("backticks: use $(...)")
        elif script.startswith("$((", i):
            raise AssertionError("arithmetic expansion is not modelled")
        elif script.startswith("$(", i):
            depth, j = 1, i + 2
            while depth:
                if script[j] in "'\"":
                    j = script.index(script[j], j + 1)
                depth += {"(": 1, ")": -1}.get(script[j], 0)
                j += 1
            commands.extend(_sh_command_words(script[i + 2:j - 1]))
            word, in_word, i = word + "X", True, j
        elif script.startswith("${", i):
            j = script.index("}", i)
            word, in_word, i = word + script[i:j + 1], True, j + 1
        elif c == "#" and not in_word:
            i = script.find("\n", i) if "\n" in script[i:] else n
        elif c == "\n":
            end_word()
            tokens.append(("op", "\n"))
            i += 1
        elif c in " \t":
            end_word()
            i += 1
        else:
            op = next((o for o in _OPERATORS if script.startswith(o, i)), None)
            if op is None:
                word, in_word, i = word + c, True, i + 1
                continue
            assert op != "<<", "heredocs are not modelled"
            if op[0] in "<>" and in_word and word.isdigit():
                word, in_word = "", False  # an IO number (2>...)
            end_word()
            tokens.append(("op", op))
            i += len(op)
    end_word()
    return tokens


def _sh_command_words(script: str) -> list[str]:
    """Every word a POSIX shell would run as a command in the script (builtins and programs alike)."""
    commands: list[str] = []
    tokens = _sh_tokens(script, commands)
    expect_command, skip_next, mode = True, False, []  # mode: a stack of "case-subject", "patterns", "body", "for"
    for kind, text in tokens:
        if skip_next:  # the target of a redirection
            skip_next = False
            continue
        if kind == "op" and text in ("<", ">", ">>", ">&", "<&"):
            skip_next = True
            continue
        state = mode[-1] if mode else None
        if state == "case-subject":
            if kind == "word" and text == "in":
                mode[-1] = "patterns"
            continue
        if state == "patterns":
            if kind == "word" and text == "esac":
                mode.pop()
                expect_command = False
            elif kind == "op" and text == ")":
                mode[-1] = "body"
                expect_command = True
            continue
        if state == "for":
            if kind == "op" and text in (";", "\n"):
                mode.pop()
                expect_command = True
            continue
        if kind == "op":
            if text == ";;" and state == "body":
                mode[-1] = "patterns"
            expect_command = True
            continue
        if not expect_command:
            continue
        if text == "esac" and state == "body":
            mode.pop()
            expect_command = False
        elif text == "case":
            mode.append("case-subject")
        elif text == "for":
            mode.append("for")
        elif text in SH_RESERVED_OPENERS:
            expect_command = True
        elif text in SH_RESERVED_CLOSERS:
            expect_command = False
        elif _ASSIGNMENT.match(text):
            expect_command = True
        else:
            commands.append(text)
            expect_command = False
    assert not mode, f"unbalanced case/for in the script: {mode}"
    return commands


def test_sh_command_words_finds_every_command() -> None:
    """The tokenizer sees commands wherever sh runs them (so the allow-list test below means something)."""
    found = _sh_command_words(
        "set -e  # comment: grep\n"
        "until mc ready x >/dev/null 2>&1; do sleep 5; done\n"
        "v=$(cat /f | tr a b) && echo \"$v grep\" || awk 1\n"
        "for b in a \"c d\" wc; do mc mb \"x/$b\"; done\n"
        "case \"$v\" in\n  *grep*|sed) cut -c1 ;;\n  *) printf '%s' 'sort'; exit 1 ;;\nesac\n"
        "if test -n \"$v\"; then { head -1; }; fi\n"
        "x=1 y=2 env\n"
    )
    # (the words of $(...) come first: the tokenizer collects them as it meets them)
    assert sorted(found) == sorted(["set", "mc", "sleep", "cat", "tr", "echo", "awk", "mc", "cut", "printf", "exit", "test", "head", "env"])
    for unsupported in ("cat <<EOF\nx\nEOF\n", "echo `id`", "echo \"$(id)\""):
        with pytest.raises(AssertionError):
            _sh_command_words(unsupported)


def _mc_scripts(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    scripts = []
    for name in RENDERED:
        for workload, template in pod_templates(rendered[name]):
            for container in containers(template):
                if container["image"].split(":")[0] != "quay.io/minio/mc":
                    continue
                if "command" not in container:  # the image's entrypoint, mc itself: `mc mirror ...`
                    assert container["args"][0] in ("mirror", "cp", "ping"), container["args"]
                    continue
                assert container["command"][0] in ("/bin/sh", "sh") and len(container["args"]) == 1
                scripts.append((f"{name} {workload['metadata']['name']}", container["args"][0]))
    return scripts


def test_mc_scripts_use_only_shell_builtins_and_mc(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The minio/mc image is ubi-micro based: no grep, sed, awk, cat, sleep... only the shell and mc."""
    scripts = _mc_scripts(rendered)
    assert scripts, "no mc container rendered (the MinIO setup Job)"
    for where, script in scripts:
        words = _sh_command_words(script)
        assert "mc" in words
        outside = sorted(set(words) - SH_BUILTINS - {"mc"})
        assert not outside, f"{where}: not in the mc image: {outside}"


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="no /bin/sh")
def test_minio_setup_script_runs_with_nothing_but_mc_on_the_path(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Run the setup script under /bin/sh with PATH holding only a stand-in `mc`: any other program would
    be `not found`. The policies it writes must be valid JSON naming the buckets."""
    job = one(rendered["overlays/cpu"], "Job", "ris-minio-setup")["spec"]["template"]["spec"]["containers"][0]
    script = job["args"][0].replace("/tmp/", f"{tmp_path}/")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mc").write_text(
        "#!/bin/sh\n"
        'echo "$*" >> "$MC_LOG"\n'
        'case "$1 $2 $3" in "admin user info") echo "AccessKey: $5"; echo "PolicyName: ris-app,ris-milvus" ;; esac\n'
    )
    (fake / "mc").chmod(0o755)
    env = {k: v["value"] for k, v in container_env(job, rendered["overlays/cpu"]).items() if "value" in v}
    env |= {"PATH": str(fake), "MC_LOG": str(tmp_path / "calls"), "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "pw",
            "APP_ACCESS_KEY": "app", "APP_SECRET_KEY": "s1", "MILVUS_ACCESS_KEY": "milvus", "MILVUS_SECRET_KEY": "s2"}
    done = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "buckets and users ready" in done.stdout
    app = json.loads((tmp_path / "app.json").read_text())
    assert {r for s in app["Statement"] for r in s["Resource"]} == {
        f"arn:aws:s3:::{env['IMAGES_BUCKET']}", f"arn:aws:s3:::{env['IMAGES_BUCKET']}/*",
        f"arn:aws:s3:::{env['INCOMING_BUCKET']}", f"arn:aws:s3:::{env['INCOMING_BUCKET']}/*",
    }
    milvus = json.loads((tmp_path / "milvus.json").read_text())
    assert {r for s in milvus["Statement"] for r in s["Resource"]} == {f"arn:aws:s3:::{env['MILVUS_BUCKET']}", f"arn:aws:s3:::{env['MILVUS_BUCKET']}/*"}
    calls = (tmp_path / "calls").read_text()
    assert "mb --ignore-existing ris/images" in calls and "admin policy attach ris ris-app --user app" in calls
