// DoLa (Chuang et al., 2023), as transformers' generate(dola_layers=...) and the DoLa
// repository's lm_score compute it: the premature layer is the candidate whose distribution is
// furthest (JSD) from the mature one, and the scores are their log-probability difference.
#include "decoders/decoder.h"

#include "dola-contrast.h"

#include <utility>

namespace dola {

namespace {

class dola_decoder : public decoder {
public:
    dola_decoder(std::vector<int32_t> candidates, double relative_top)
        : candidates_(std::move(candidates)), relative_top_(relative_top) {}

    const std::vector<int32_t> & layers() const override { return candidates_; }

    bool wants_device_rows() const override { return candidates_.size() > 1; }

    void step(const decoder_rows & rows, float * lp, float * scores, step_result & res) override {
        if (rows.device) {
            const int32_t K = (int32_t) candidates_.size();
            int32_t best = 0;
            for (int32_t k = 1; k < K; ++k) {
                if (rows.device->jsd[k] > rows.device->jsd[best]) best = k;  // first on ties, as torch's argmax
            }
            // the mature log-probabilities, and the premature ones into scores for the contrast in place
            const int32_t which[2] = {K, best};
            float * const into[2] = {lp, scores};
            rows.device->log_softmax(2, which, into);
            contrast_scores(lp, scores, rows.n_vocab, relative_top_, scores);
            res.premature_layer = candidates_[best];
            res.jsd.assign(rows.device->jsd, rows.device->jsd + K);
            res.entropy = (float) rows.device->entropy;
            return;
        }
        contrast_result c = dola_step(rows.mature, rows.projected, (int32_t) candidates_.size(), rows.n_vocab,
                                      relative_top_, lp, scores, rows.n_threads);
        res.premature_layer = candidates_[c.premature_index];
        res.jsd = std::move(c.jsd);
        res.entropy = (float) c.entropy;
    }

    const float * score(const decoder_rows & rows, const score_options & opt, float * lp, float * work,
                        score_detail & detail) override {
        const int64_t V = rows.n_vocab;
        contrast_result c = dola_step(rows.mature, rows.projected, (int32_t) candidates_.size(), V, 0.0, lp, nullptr,
                                      rows.n_threads);
        detail.layer = candidates_[c.premature_index];
        if (!c.jsd.empty()) detail.jsd = c.jsd[c.premature_index];
        lm_score_diff(lp, rows.projected + (size_t) c.premature_index * V, V, opt.post_softmax, opt.relative_top,
                      opt.mask_value, work);
        return work;
    }

private:
    std::vector<int32_t> candidates_;  // premature candidates, in order, without duplicates
    double relative_top_;
};

}  // namespace

std::unique_ptr<decoder> make_dola_decoder(const std::vector<int32_t> & candidates, double relative_top) {
    return std::make_unique<dola_decoder>(candidates, relative_top);
}

}  // namespace dola
