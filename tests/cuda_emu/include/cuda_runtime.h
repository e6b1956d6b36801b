// cuda_emu stub of <cuda_runtime.h>.
#pragma once
#include "cuda_emu.h"
