# Recompute every BatchNorm's running statistics of an Ultralytics checkpoint on training samples
# (cumulative average over N dumped samples from FIRST, batches of 8, train-mode forward, no
# gradient) and save a copy: tells stale statistics from weights that generalise worse.
# Usage: recalibrate_bn.py SRC.pt DST.pt FIRST N [DUMP_DIR]
import sys, torch, cv2, numpy as np
src, dst, first, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dump = sys.argv[5] if len(sys.argv) > 5 else "/root/exp/augstats/kiln-dump"
torch.set_num_threads(2)
ck = torch.load(src, weights_only=False)
net = ck["model"].float()
for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.reset_running_stats(); m.momentum = None
net.train()
with torch.no_grad():
    for s in range(first, first + n, 8):
        imgs = [cv2.imread(f"{dump}/images/s{i:05d}.png")[:, :, ::-1] for i in range(s, min(s + 8, first + n))]
        x = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy()).float() / 255
        net(x)
net.eval()
ck["model"] = net.half()
torch.save(ck, dst)
print("recalibrated", src, "->", dst)
