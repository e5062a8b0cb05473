import sys
from blda_tools.inference.dump import dump_logits
from blda_tools.inference.pixel_sampling import PixelSampling
ck=sys.argv[1]; out=sys.argv[2]; root="/work/main/sample_data/synthcity/target"
n=[0]
def prog(k):
    n[0]+=k
    if n[0]>=10: raise KeyboardInterrupt
kw=dict(device="cpu", workers=0, sampling=PixelSampling(pixels_per_image=30, stratified=True), compression="gzip")
try:
    dump_logits("tiny", ck, "cityscapes", root, "val", out, progress=prog, **kw)
except KeyboardInterrupt: print("interrupted")
import os; print(os.listdir(os.path.dirname(out) or "."))
