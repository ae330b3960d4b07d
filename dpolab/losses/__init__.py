"""Preference losses as pure functions of per-sequence log-probs, and the registry of named terms.

    core            the original DPO family: dpo, robust (rDPO), ipo, slic, dpop, sft, auxdpo, gpo
    variants        TRL's other loss types under TRL's names: sigmoid, hinge, exo_pair, nca_pair,
                    bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop,
                    sigmoid_norm, and TRL's length-normalised ipo (ipo_norm)
    reference_free  simpo, cpo, orpo: no reference model at all
    modifiers       f-divergence scores (f-DPO), LD-DPO sequence log-probs
    registry        named terms (LOSSES), the summed-vs-averaged rule, Objective
"""

from dpolab.losses.core import (GPO_FAMILY, amplitude_penalty, authors_amplitude_term,
                                auxdpo_loss, capped_aux_reward, dpo_loss, dpop_loss,
                                gpo_derivative, gpo_loss, ipo_loss, logratio_margin,
                                robust_dpo_loss, sft_loss, slic_loss)
from dpolab.losses.modifiers import (F_DIVERGENCES, f_divergence_margin, f_divergence_score,
                                     ld_flat_logps, ld_sequence_logps)
from dpolab.losses.reference_free import (cpo_loss, log1mexp, orpo_log_odds_ratio, orpo_loss,
                                          simpo_loss)
from dpolab.losses.registry import (LOGPS_CHOICES, LOSSES, Objective, PairLogps, Term,
                                    check_hyper, get_loss, logps_reduction)
from dpolab.losses.variants import (aot_loss, aot_unpaired_loss, apo_down_loss, apo_zero_loss,
                                    bco_pair_loss, discopop_loss, exo_pair_loss, hinge_loss,
                                    ipo_norm_loss, nca_pair_loss, robust_loss, sigmoid_loss,
                                    sigmoid_norm_loss, sppo_hard_loss)

__all__ = [
    "GPO_FAMILY", "amplitude_penalty", "authors_amplitude_term", "auxdpo_loss",
    "capped_aux_reward", "dpo_loss", "dpop_loss", "gpo_derivative",
    "gpo_loss", "ipo_loss", "logratio_margin", "robust_dpo_loss",
    "sft_loss", "slic_loss", "F_DIVERGENCES", "f_divergence_margin", "f_divergence_score",
    "ld_flat_logps", "ld_sequence_logps", "cpo_loss", "log1mexp",
    "orpo_log_odds_ratio", "orpo_loss", "simpo_loss", "LOGPS_CHOICES", "LOSSES",
    "Objective", "PairLogps", "Term", "check_hyper", "get_loss", "logps_reduction", "aot_loss",
    "aot_unpaired_loss", "apo_down_loss", "apo_zero_loss", "bco_pair_loss", "discopop_loss",
    "exo_pair_loss", "hinge_loss", "ipo_norm_loss", "nca_pair_loss", "robust_loss",
    "sigmoid_loss", "sigmoid_norm_loss", "sppo_hard_loss",
]
