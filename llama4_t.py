import re, torch
from torch import nn
from t import *
import fam3
torch.manual_seed(0)
m = fam3.llama4()
names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and not n.endswith("lm_head") and "router" not in n]
print([n for n in names if "language_model" in n and "self_attn" not in n])
no_router = "(" + "|".join(re.escape(n) for n in names) + ")"
attn_plus_vision = "(" + "|".join(re.escape(n) for n in names if "language_model" not in n or "self_attn" in n) + ")"
inp = fam3.llama4_in()
check("llama4_norouter", fam3.llama4, inp, targets=no_router, gen=False)
check("llama4_attn_vision", fam3.llama4, inp, targets=attn_plus_vision)
