# A copy of an initial checkpoint with every parameter multiplied by (1 + 1e-5 * N(0, 1)), written as
# NAME.pt (Ultralytics) and NAME.safetensors (kiln, official key names): the trajectory-noise control.
# Usage: perturb_init.py SRC.pt SEED OUT_STEM   (e.g. ~/exp/init/m0.pt 123 ~/exp/init/m0p)
import sys, torch
from safetensors.torch import save_file
src, seed, stem = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ck = torch.load(src, weights_only=False)
g = torch.Generator().manual_seed(seed)
with torch.no_grad():
    for _, p in ck["model"].named_parameters():
        p.mul_(1 + 1e-5 * torch.randn(p.shape, generator=g))
torch.save(ck, f"{stem}.pt")
save_file({k: v.detach().float().contiguous() for k, v in ck["model"].state_dict().items()
           if not k.endswith("num_batches_tracked")}, f"{stem}.safetensors")
print("wrote", stem + ".pt", stem + ".safetensors")
