// The dola-cpp engine, for the bindings: GGUF checks, models, decoding sessions and the batch engine. Knows no Python.
#pragma once

#include "dola-batch.h"
#include "dola-contrast.h"
#include "dola-error.h"
#include "dola-gguf.h"
#include "dola-log.h"
#include "dola-model.h"
#include "dola-rpc.h"
#include "dola-schema.h"
#include "dola-session.h"
