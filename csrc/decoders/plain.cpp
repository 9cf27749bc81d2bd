// Plain decoding: the mature logits as they are.
#include "decoders/decoder.h"

#include "dola-contrast.h"

#include <cstring>

namespace dola {

namespace {

class plain_decoder : public decoder {
public:
    const std::vector<int32_t> & layers() const override { return layers_; }

    void step(const decoder_rows & rows, float * lp, float * scores, step_result & res) override {
        log_softmax(rows.mature, lp, rows.n_vocab);
        res.entropy = (float) entropy(lp, rows.n_vocab);
        std::memcpy(scores, rows.mature, rows.n_vocab * sizeof(float));
    }

    const float * score(const decoder_rows & rows, const score_options &, float * lp, float *,
                        score_detail &) override {
        log_softmax(rows.mature, lp, rows.n_vocab);
        return lp;
    }

private:
    std::vector<int32_t> layers_;
};

}  // namespace

std::unique_ptr<decoder> make_plain_decoder() { return std::make_unique<plain_decoder>(); }

}  // namespace dola
