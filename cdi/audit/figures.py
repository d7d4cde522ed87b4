"""What each number of ``result.json`` is, for the protocol that ran.

``result.json`` keeps the field names of its schema version 1 (``p_value_ttest``,
``statistic``, ``df``), which were named after the Welch t-test of the first
protocol. Under the other protocols the same fields hold other figures, so the
result records, in ``protocol["figures"]``, what each of them is for the test
that actually ran (``figure_labels``); the report labels its numbers with the
same words.
"""

from __future__ import annotations

#: What the top-level numeric fields of result.json hold, per protocol.
_BY_PROTOCOL: dict[str, dict[str, str]] = {
    "pooled": {
        "p_value_ttest": ("parametric p-value of the pooled test: 1 - Phi(Z) of the combined Z (weighted Stouffer "
                          "combination of part 1, Student's t on the known member directions, and part 2, "
                          "Rao's F on the other directions); not a t-test p-value despite the field's name"),
        "statistic": "combined Z of the pooled test (standard normal if the published images were not used)",
        "df": "n - 2: degrees of freedom of part 1's Student t-test",
        "effect_size": "Hedges' g of the prior score (published minus unpublished, all images)",
        "auc": "AUC of the prior score (published versus unpublished, all images)",
    },
    "sequential": {
        "p_value_ttest": ("parametric p-value of the sequential test: 1 - Phi(Z) of the Stouffer combination of "
                          "the blocks' one-sided Welch t-tests"),
        "statistic": "Stouffer Z over the blocks (standard normal if the published images were not used)",
        "df": "not applicable (each block's Welch df is in protocol.blocks)",
        "effect_size": "Hedges' g of the scores in each tested block, averaged with the block weights",
        "auc": "AUC of the scores in each tested block, averaged with the block weights",
    },
    "crossfit": {
        "p_value_ttest": ("one-sided Welch t-test p-value of the out-of-fold scores; it rejects too often when the "
                          "published images were not used (out-of-fold scores are not independent), so the "
                          "verdict uses the permutation p-value instead"),
        "statistic": "Welch t of the out-of-fold scores (published minus unpublished)",
        "df": "Welch-Satterthwaite degrees of freedom of that t-test",
        "effect_size": "Hedges' g of the out-of-fold scores",
        "auc": "AUC of the out-of-fold scores",
    },
}

#: The scoring-model fields of a test result that describe no step of the pooled protocol.
NOT_RUN_UNDER_POOLED = ("scorer", "folds", "penalty", "blocks")


def figure_labels(protocol: str, verdict_test: str, permutations: int) -> dict[str, str]:
    """``{result.json field: what it holds}`` for a test under ``protocol`` whose verdict used ``verdict_test``.

    ``verdict_test`` is ``TestResult.verdict_test`` (``"permutation"`` or the
    parametric test's name); ``permutations`` the number of shuffles (0: none ran).
    """
    labels = dict(_BY_PROTOCOL[protocol])
    parametric = {"pooled": "the pooled test's parametric p-value (p_value_ttest)",
                  "sequential": "the sequential test's parametric p-value (p_value_ttest)",
                  "crossfit": "the permutation p-value"}[protocol]
    labels["p_value"] = "the verdict's p-value: " + (
        "the permutation p-value (p_value_permutation)" if verdict_test == "permutation" else parametric)
    labels["p_value_permutation"] = (
        f"permutation p-value: (1 + number of the {permutations} label shuffles whose statistic reached the "
        f"observed one) / ({permutations} + 1)" if permutations else "not computed (no permutations were asked for)")
    return {key: labels[key] for key in ("p_value", "p_value_ttest", "p_value_permutation", "statistic", "df",
                                         "effect_size", "auc")}
