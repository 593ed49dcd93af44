import json, csv, numpy as np
d = "/root/exp/cross/lockstep600/"
k = np.array([[float(a[f"train/{n}_loss"]) for n in ("box", "seg", "cls", "dfl")] for a in csv.DictReader(open(d + "kiln-ultra/results.csv"))])
u = np.array(json.load(open(d + "ultra-ultra/losses.json")))[:, :4]
n = min(len(k), len(u))
for lo in range(0, n, 15):
    hi = min(lo + 15, n)
    r = k[lo:hi].mean(0) / u[lo:hi].mean(0)
    print(f"epochs {lo+1:3}-{hi:3} (batches {lo*4+1}-{hi*4}) kiln {np.round(k[lo:hi].mean(0),3)} ultra {np.round(u[lo:hi].mean(0),3)} ratio {np.round(r,3)}")
