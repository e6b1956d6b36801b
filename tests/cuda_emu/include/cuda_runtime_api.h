// cuda_emu stub of <cuda_runtime_api.h>.
#pragma once
#include "cuda_emu.h"
