import h, torch
h.DT = torch.float32
from t import *
import fam3
inp = {k: (v.float() if v.is_floating_point() else v) for k, v in fam3.aria_in().items()}
check("aria_f32", fam3.aria, inp, tol=1e-5, tuner=True)
