"""The tree ensembles' fast path: the fitted trees as treelite imports them, walked by one compiled loop.

scikit-learn offers no public view of a histogram gradient boosting's trees, and its own predict re-encodes the
categories and starts threads per call. Treelite, a library made to carry tree ensembles between frameworks, imports
the fitted estimator (`treelite.sklearn.import_model` for boosting and forests, `treelite.frontend.from_lightgbm` for
LightGBM's booster, categorical splits included) and shows every tree's nodes through its public accessors; they are
copied into one array of node records, each tree in preorder, that a numba-compiled loop walks, for one encounter or
many. Treelite's own `gtil.predict` gives the same numbers but costs several times the CPU on a batch, and more than
the whole path on one encounter (benchmarks/README.md).

Explanations: LightGBM's own `pred_contrib` gives each encounter's exact SHAP values (TreeSHAP), which with the
booster's expected value sum to its log-odds; the calibration's sigmoid is affine in them, so after it they still
sum, with a stated base value, to the log-odds of the probability served. scikit-learn's trees have no such
accessor: their versions are explained by occlusion, which does not add up.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import polars as pl
import treelite
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.preprocessing import OrdinalEncoder

from readmission_platform.lib.features import CATEGORICAL_FEATURES, FEATURE_COLUMNS, NUMERIC_FEATURES
from readmission_platform.lib.training import LightGBMClassifier
from readmission_platform.serving.fast.encoding import (
    UNKNOWN,
    Attribution,
    Lookup,
    Parts,
    UnsupportedModel,
    domains,
    encode,
    probe,
    tables,
)

METHOD = "occlusion: the change in probability when the feature is withheld, which the trees route as a missing value"
SHAP_METHOD = (
    "exact: SHAP values of the boosted trees (LightGBM's TreeSHAP), in log-odds after calibration, which with "
    "`base_value` sum to the log-odds of the probability"
)
LEAF, NUMERICAL, CATEGORICAL = 0, 1, 2  # treelite's node types
LESS_OR_EQUAL = 3  # treelite's comparison operator of a numerical split


# One node in one record, so that a step down a tree reads one place in memory: the threshold (a leaf: its value),
# the split's feature (-1 at a leaf), the right child (the left one is the next node: each tree is stored in preorder,
# left first), where the split's categories start in `category_left` (-1: a numerical split) and how many it lists,
# and the side a missing value takes.
NODE = np.dtype(
    [("value", np.float64), ("right", np.int32), ("feature", np.int32), ("category_at", np.int32),
     ("category_width", np.int32), ("default_left", np.bool_)],
    align=True,
)  # fmt: skip


@numba.njit(nogil=True, cache=True)
def _leaf(x, row, i, nodes, category_left):
    """The value of the leaf row `row` of `x` reaches from node `i`: a categorical split sends a code left when
    `category_left[category_at + code]`; NaN follows `default_left`."""
    node = nodes[i]
    while node.feature >= 0:
        value = x[row, node.feature]
        if value != value:
            left = node.default_left
        elif node.category_at >= 0:
            code = np.int64(value)
            left = 0 <= code < node.category_width and category_left[node.category_at + code]
        else:
            left = value <= node.value
        i = i + 1 if left else node.right
        node = nodes[i]
    return node.value


@numba.njit(nogil=True, cache=True)
def _walk(x, roots, nodes, category_left, base, mean, out):
    """Each row's response: the sum of its leaves' values over the trees at `roots` (their mean for a forest), onto
    `base`. Tree by tree, so one tree's nodes stay in cache while every row walks it.
    """
    out[:] = base
    for root in roots:
        for row in range(x.shape[0]):
            out[row] += _leaf(x, row, root, nodes, category_left)
    if mean:
        out /= len(roots)
    return out


@numba.njit(nogil=True, cache=True)
def _walk_one(x, roots, nodes, category_left, base, mean):
    """`_walk`'s response of the first row of `x`, as a number: the same sum in the same order, without an output
    array to make and read back."""
    total = base
    for root in roots:
        total += _leaf(x, 0, root, nodes, category_left)
    if mean:
        total /= len(roots)
    return total


def _preorder(left: np.ndarray, right: np.ndarray, leaf: np.ndarray) -> np.ndarray:
    """A tree's node ids in preorder, left child first, from the root (node 0)."""
    order, stack = [], [0]
    while stack:
        i = stack.pop()
        order.append(i)
        if not leaf[i]:
            stack += [right[i], left[i]]
    return np.array(order, dtype=np.int64)


class Forest:
    """Every tree of a treelite model as `NODE` records in preorder, one tree after another, for `_walk`."""

    def __init__(self, model: treelite.Model, *, response_class: int) -> None:
        header = model.get_header_accessor()
        trees, category_left, roots = [], [], []
        offset = categories = 0
        for t in range(model.num_tree):
            tree = model.get_tree_accessor(t)
            kind = tree.get_field("node_type")
            n = len(kind)
            if np.any((kind == NUMERICAL) & (tree.get_field("cmp") != LESS_OR_EQUAL)):
                raise UnsupportedModel("a numerical split compares by other than <=; expected a <= threshold")
            if np.any((kind == CATEGORICAL) & (tree.get_field("category_list_right_child") != 0)):
                raise UnsupportedModel("a categorical split names the categories that go right; expected left")
            leaf = kind == LEAF
            left, right = tree.get_field("cleft"), tree.get_field("cright")
            vector = tree.get_field("leaf_vector")
            if len(vector):  # one value per class at each leaf (a forest's class fractions)
                leaf_value = np.zeros(n)
                leaf_value[leaf] = vector[tree.get_field("leaf_vector_begin")[leaf].astype(np.int64) + response_class]
            else:
                leaf_value = tree.get_field("leaf_value")
            listed, begin, end = tree.get_field("category_list"), tree.get_field("category_list_begin"), tree.get_field("category_list_end")
            at, width = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
            for i in np.flatnonzero(kind == CATEGORICAL):
                codes = listed[begin[i]:end[i]].astype(np.int64)
                table = np.zeros(int(codes.max()) + 1 if len(codes) else 0, dtype=np.bool_)
                table[codes] = True
                at[i], width[i] = categories, len(table)
                category_left.append(table)
                categories += len(table)
            order = _preorder(left, right, leaf)
            position = np.empty(n, dtype=np.int64)
            position[order] = np.arange(n) + offset
            nodes = np.zeros(n, dtype=NODE)
            nodes["value"] = np.where(leaf, leaf_value, tree.get_field("threshold"))[order]
            nodes["feature"] = np.where(leaf, -1, tree.get_field("split_index"))[order]
            nodes["right"] = np.where(leaf, -1, position[np.where(leaf, 0, right)])[order]
            nodes["category_at"], nodes["category_width"] = at[order], width[order]
            nodes["default_left"] = tree.get_field("default_left").astype(np.bool_)[order]
            trees.append(nodes)
            roots.append(offset)
            offset += n
        self.nodes = np.concatenate(trees)
        self.category_left = np.concatenate(category_left) if category_left else np.zeros(0, dtype=np.bool_)
        self.roots = np.array(roots, dtype=np.int64)
        self.base = float(np.ravel(header.get_field("base_scores"))[response_class])
        self.mean = bool(np.ravel(header.get_field("average_tree_output"))[0])

    def responses(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        return _walk(x, self.roots, self.nodes, self.category_left, self.base, self.mean, out)

    def response(self, x: np.ndarray) -> float:
        """The response of the first row of `x`."""
        return _walk_one(x, self.roots, self.nodes, self.category_left, self.base, self.mean)


def _import(estimator) -> tuple[treelite.Model, int]:
    """The treelite model of a fitted binary estimator, and which of its outputs is the response calibration takes."""
    if isinstance(estimator, HistGradientBoostingClassifier):
        if len(estimator.classes_) != 2:
            raise UnsupportedModel("only binary histogram gradient boosting is supported")
        return treelite.sklearn.import_model(estimator), 0  # one output: the log-odds
    if isinstance(estimator, RandomForestClassifier):
        if list(estimator.classes_) != [0, 1] or estimator.n_outputs_ != 1:
            raise UnsupportedModel("only a binary 0/1 random forest is supported")
        return treelite.sklearn.import_model(estimator), 1  # the probability of class 1
    if isinstance(estimator, LightGBMClassifier):
        if len(estimator.classes_) != 2:
            raise UnsupportedModel("only a binary LightGBM classifier is supported")
        return treelite.frontend.from_lightgbm(estimator.booster_), 0  # one output: the log-odds
    raise UnsupportedModel(f"no fast path for {type(estimator).__name__}; expected logistic regression or trees")


class TreeScorer:
    """Categories to the pipeline's codes by tables, numbers as they are, the trees walked, the response calibrated."""

    def __init__(self, parts: Parts, *, threads: int | None = None) -> None:
        """`threads`: threads that share a batch's rows (default one: the caller's)."""
        if not (isinstance(parts.encoder, OrdinalEncoder) and parts.numeric == "passthrough"):
            raise UnsupportedModel("expected ordinal-coded categories and raw numbers before the trees")
        try:
            model, response_class = _import(parts.estimator)
            self._forest = Forest(model, response_class=response_class)
        # Treelite's importer reads the estimator's internals, and asserts on them: a release of either that no
        # longer fits the other is a model without a fast path, not a worker that fails to start.
        except (treelite.TreeliteError, AssertionError, AttributeError, NotImplementedError) as error:
            raise UnsupportedModel(f"treelite cannot import the {type(parts.estimator).__name__}: {error!r}") from error
        self._parts = parts
        self._booster = parts.estimator.booster_ if isinstance(parts.estimator, LightGBMClassifier) else None
        self.method = METHOD if self._booster is None else SHAP_METHOD
        self._threads = threads or 1
        # scikit-learn's trees compare float32 inputs; boosting compares float64.
        self._float32 = isinstance(parts.estimator, RandomForestClassifier)
        blocks = parts.blocks
        self._width = blocks["numeric"].stop
        categorical_at = {name: blocks["categorical"].start + i for i, name in enumerate(CATEGORICAL_FEATURES)}
        values = domains(parts.encoder)
        codes = tables(values, encode(parts.preprocess, probe(values)), categorical_at)
        self._categorical = [
            (name, categorical_at[name], table := {value: float(code) for value, code in codes[name].items()}, table[UNKNOWN])
            for name in CATEGORICAL_FEATURES
        ]
        self._lookups = [(name, at, Lookup(table)) for name, at, table, _ in self._categorical]
        self._numeric_at = [(name, blocks["numeric"].start + i) for i, name in enumerate(NUMERIC_FEATURES)]

    def _row(self, features: Mapping[str, float | str]) -> np.ndarray:
        row = np.empty(self._width)
        for name, at, codes, unknown in self._categorical:
            row[at] = codes.get(features[name], unknown)
        for name, at in self._numeric_at:
            row[at] = features[name]
        return row

    def _probabilities(self, x: np.ndarray) -> np.ndarray:
        if self._float32:
            x = x.astype(np.float32).astype(np.float64)
        out = np.empty(len(x))
        if self._threads == 1 or len(x) < 2 * self._threads:
            self._forest.responses(x, out)
        else:  # the loop releases the GIL, so threads walk their share of the rows at once
            bounds = np.linspace(0, len(x), self._threads + 1).astype(int)
            with ThreadPoolExecutor(self._threads) as pool:
                list(pool.map(lambda a, b: self._forest.responses(x[a:b], out[a:b]), bounds[:-1], bounds[1:]))
        return self._parts.calibrated(out)

    def probability(self, features: Mapping[str, float | str]) -> float:
        x = self._row(features)[None, :]
        if self._float32:
            x = x.astype(np.float32).astype(np.float64)
        # As a batch's row is calibrated, not as `calibrated` takes a float: /predict_batch answers the same bits.
        return float(self._parts.calibrated_as_arrays(self._forest.response(x)))

    def probabilities(self, frame: pl.DataFrame) -> np.ndarray:
        x = np.empty((frame.height, self._width))
        for name, at, lookup in self._lookups:
            x[:, at] = lookup(frame[name])
        for name, at in self._numeric_at:
            x[:, at] = frame[name].to_numpy()
        return self._probabilities(x)

    def contributions(self, features: Mapping[str, float | str]) -> dict[str, float]:
        """Each feature's change in probability when it is withheld (NaN: missing, or an unknown category)."""
        rows = np.tile(self._row(features), (len(FEATURE_COLUMNS) + 1, 1))
        withheld = {name: (at, unknown) for name, at, _, unknown in self._categorical}
        withheld |= {name: (at, np.nan) for name, at in self._numeric_at}
        for k, name in enumerate(FEATURE_COLUMNS, start=1):
            at, value = withheld[name]
            rows[k, at] = value
        probability = self._probabilities(rows)
        return {name: float(probability[0] - probability[k]) for k, name in enumerate(FEATURE_COLUMNS, start=1)}

    def explain(self, features: Mapping[str, float | str]) -> Attribution:
        """LightGBM: exact SHAP values in the calibrated log-odds, and the base value they start from. Other trees:
        occlusion (`contributions`), in probability, with no base value, as they do not add up."""
        if self._booster is None:
            return Attribution(terms=self.contributions(features), base=None)
        shap = self._booster.predict(self._row(features)[None, :], pred_contrib=True)[0]
        # The calibrated log-odds are -(a * raw + b), raw = expected value + the sum of the SHAP values.
        a, b = self._parts.a, self._parts.b
        at = {name: at for name, at, _, _ in self._categorical} | dict(self._numeric_at)
        return Attribution(terms={name: float(-a * shap[at[name]]) for name in FEATURE_COLUMNS}, base=float(-(a * shap[-1] + b)))
