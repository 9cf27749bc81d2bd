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
