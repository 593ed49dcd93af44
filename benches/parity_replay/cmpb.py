import sys, numpy as np
def rd(p):
    rows=[l.split()[1:5] for l in open(p) if l.startswith('BATCH')]
    return np.array(rows,dtype=float)
k=rd(sys.argv[1]); u=rd(sys.argv[2]); n=min(len(k),len(u)); k=k[:n]; u=u[:n]
W=int(sys.argv[3]) if len(sys.argv)>3 else 10
print('batches',n,' ratio kiln/ultra of the mean over windows of',W,'(box seg cls dfl)')
for s in range(0,n,W):
    print('%4d-%4d'%(s+1,min(s+W,n)),' '.join('%.3f'%x for x in k[s:s+W].mean(0)/u[s:s+W].mean(0)), '  ultra', ' '.join('%.3f'%x for x in u[s:s+W].mean(0)))
