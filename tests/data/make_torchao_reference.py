"""Writes tests/data/torchao_rtn_reference.pt: torchao's group-wise symmetric quantization of
fixed weights (int8 and int4, fp32 and bf16, group 128), which `audit.quantize.rtn_symmetric`
must reproduce bit for bit (tests/test_audit.py). torchao is optional: run this where it is
installed (`pip install torchao==0.18.0`) to regenerate.

    .venv/bin/python tests/data/make_torchao_reference.py
"""

from pathlib import Path

import torch

from dsunlearn.audit.quantize import torchao_symmetric


def main() -> None:
    import torchao

    out = {"torchao": torchao.__version__, "cases": []}
    for dtype in (torch.float32, torch.bfloat16):
        for bits in (8, 4):
            w = (torch.randn(16, 256, generator=torch.Generator().manual_seed(bits)) * 0.05).to(
                dtype
            )
            out["cases"].append({"bits": bits, "w": w, "q": torchao_symmetric(w, bits, 128)})
    path = Path(__file__).with_name("torchao_rtn_reference.pt")
    torch.save(out, path)
    print(f"wrote {path} (torchao {torchao.__version__})")


if __name__ == "__main__":
    main()
