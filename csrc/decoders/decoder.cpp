#include "decoders/decoder.h"

namespace dola {

namespace {

std::unique_ptr<decoder> make_base_decoder(const decode_params & p) {
    if (p.candidates.empty()) return make_plain_decoder();
    std::vector<int32_t> unique;
    for (int32_t l : p.candidates) {
        bool seen = false;
        for (int32_t u : unique) seen = seen || u == l;
        if (!seen) unique.push_back(l);
    }
    return make_dola_decoder(unique, p.relative_top);
}

}  // namespace

std::unique_ptr<decoder> make_decoder(const decode_params & p) {
    std::unique_ptr<decoder> base = make_base_decoder(p);
    if (!p.activation) return base;
    return make_activation_decoder(std::move(base), p.info_layer, p.alpha, p.relative_top);
}

}  // namespace dola
