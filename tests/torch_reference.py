"""The one torch reference for teacher-forced DoLa scoring: the DoLa repository's ``lm_score``
(dola.py), recomputed from a transformers forward pass. Shared by test_reference.py and
test_eval.py."""

import numpy as np
import torch
import torch.nn.functional as F


def forward(hf_model, ids):
    """A transformers forward pass with every layer's hidden state."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids]), output_hidden_states=True)


def lm_score(hf_model, out, ids, n_prefix, candidates, mature, relative_top, post_softmax):
    """(score, chosen premature layer per continuation token, [] for plain) of ids[n_prefix:]
    after ids[:n_prefix], from ``out`` = ``forward(hf_model, ids)``."""
    n_layer = hf_model.config.num_hidden_layers
    head = hf_model.get_output_embeddings()
    rows = slice(n_prefix - 1, len(ids) - 1)  # the positions that predict the continuation
    with torch.no_grad():
        def layer(j):
            return out.logits[0, rows] if j == n_layer else head(out.hidden_states[j][0, rows])

        final = layer(mature).log_softmax(-1)
        cont = torch.tensor(ids[n_prefix:])
        t = torch.arange(len(cont))
        if not candidates:
            return final[t, cont].sum().item(), []
        cand = torch.stack([layer(j) for j in candidates])  # [K, T, V]
        if len(candidates) == 1:
            chosen = [candidates[0]] * len(cont)
            base = cand[0]
        else:
            lq = cand.log_softmax(-1)
            m = 0.5 * (final.exp()[None] + lq.exp())
            js = 0.5 * (F.kl_div(final[None].expand_as(lq), m, reduction="none").mean(-1)
                        + F.kl_div(lq, m, reduction="none").mean(-1))  # [K, T]
            idx = js.argmax(0)
            chosen = [candidates[i] for i in idx.tolist()]
            base = cand[idx, t]
        diff = final - base.log_softmax(-1)
        if post_softmax:
            diff = diff.log_softmax(-1)
        if relative_top > 0:
            mask = final < final.max(-1, keepdim=True).values + np.log(relative_top)
            diff = torch.where(mask, torch.tensor(-1000.0), diff)
        return diff[t, cont].sum().item(), chosen


# --------------------------------------------------------------------------- Activation Decoding
# hkust-nlp/Activation_Decoding, recomputed from transformers forward passes: H_v is the entropy
# over context positions p of softmax_p(lm_head(hidden_states[info_layer])[p, v]).


def context_entropy(hf_model, hidden_states, info_layer):
    """H [V] of every vocabulary entry over the positions of ``hidden_states`` (the reference's
    ``Categorical(probs=softmax(info_layer_score.T, dim=1)).entropy()``)."""
    head = hf_model.get_output_embeddings()
    with torch.no_grad():
        info = head(hidden_states[info_layer][0])  # [P, V]
        probs = F.softmax(info.t(), dim=1)
        return torch.distributions.Categorical(probs=probs, validate_args=False).entropy()


def activation_lm_score(hf_model, out, ids, n_prefix, info_layer, alpha, candidates=(), mature=None,
                        relative_top=0.0, post_softmax=False):
    """The reference's lm_score in mode ``activation`` (no candidates) or ``with_dola``: the
    plain or DoLa score of each continuation token minus alpha * H[token], H over every position
    of ``ids`` (prefix and continuation). Its relative-top mask for ``activation`` is computed
    there and never applied; the ``final_logits[0] < -1e3`` mask is empty for finite logits."""
    n_layer = hf_model.config.num_hidden_layers
    base, _ = lm_score(hf_model, out, ids, n_prefix, list(candidates), mature or n_layer, relative_top, post_softmax)
    H = context_entropy(hf_model, out.hidden_states, info_layer)
    return base - alpha * float(H[torch.tensor(ids[n_prefix:])].sum())


def activation_generate(hf_model, ids, max_new_tokens, info_layer, alpha, candidates=(), relative_top=0.1,
                        repetition_penalty=1.0):
    """Greedy generation as the reference's activation_greedy_decode (no candidates) and
    activation_dola_greedy_decode: H once, from the prompt's positions at the first step; scores
    = relative-top-filtered log_softmax(final) [- raw premature logits] - alpha * H, then the
    repetition penalty. Returns (tokens, scores of the chosen tokens, logsumexp of the premature
    logits per step (0 without candidates), H)."""
    head = hf_model.get_output_embeddings()
    seq = list(ids)
    tokens, scores, shifts = [], [], []
    past = None
    inp = torch.tensor([ids])
    H = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = hf_model(inp, past_key_values=past, use_cache=True, output_hidden_states=True)
            past = out.past_key_values
            if H is None:
                H = context_entropy(hf_model, out.hidden_states, info_layer)
            final = out.logits[0, -1]
            lp = final.log_softmax(-1)
            if relative_top > 0:  # the reference's code needs it; 0 = no filter
                thr = lp.max() + np.log(relative_top)
                lp = torch.where(lp < thr, torch.tensor(-float("inf")), lp)
            shift = 0.0
            if candidates:
                cand = torch.stack([head(out.hidden_states[j][0, -1]) for j in candidates])  # [K, V]
                pm = F.softmax(final, -1)
                pq = F.softmax(cand, -1)
                m = 0.5 * (pm[None] + pq)
                js = 0.5 * (F.kl_div(final.log_softmax(-1)[None].expand_as(cand), m, reduction="none").mean(-1)
                            + F.kl_div(cand.log_softmax(-1), m, reduction="none").mean(-1))
                base = cand[int(js.argmax())]
                lp = lp - base  # the reference subtracts the raw premature logits
                shift = float(torch.logsumexp(base, -1))
            s = lp - alpha * H
            if repetition_penalty != 1.0:
                idx = torch.tensor(seq)
                g = s[idx]
                s[idx] = torch.where(g < 0, g * repetition_penalty, g / repetition_penalty)
            t = int(s.argmax())
            tokens.append(t)
            scores.append(float(s[t]))
            shifts.append(shift)
            seq.append(t)
            inp = torch.tensor([[t]])
    return tokens, scores, shifts, H
