# kiln's weights (safetensors, official state-dict names) as an Ultralytics checkpoint, so that both
# tools' final weights are scored by one scorer (parity_score.py --ultralytics-run on a directory
# holding weights/epoch30.pt). TEMPLATE is any Ultralytics checkpoint of the same model (e.g. the
# other tool's last.pt): its structure is kept, its tensors replaced.
# Usage: kiln_to_ultralytics.py KILN.safetensors TEMPLATE.pt OUT.pt
import sys, torch
from safetensors.torch import load_file
src, template, dst = sys.argv[1:4]
ck = torch.load(template, weights_only=False)
net = ck["model"].float()
sd = load_file(src)
missing, unexpected = net.load_state_dict(sd, strict=False)
missing = [m for m in missing if not m.endswith("num_batches_tracked")]
assert not missing and not unexpected, (missing[:5], unexpected[:5])
ck["model"] = net
torch.save(ck, dst)
print("wrote", dst, len(sd), "tensors")
