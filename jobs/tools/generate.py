"""`userformer generate`: deterministic synthetic behaviour logs in the raw contract.

For each drop date D in start .. start+days-1 it writes
  OUT/events/dt=D/part-00000.parquet  (schema RAW_EVENTS; D is the ARRIVAL date)
  OUT/items/dt=D/items.parquet        (schema RAW_ITEMS; day 1: the catalogue,
                                       later days: launched items + price changes)

The world: items with Zipf popularity in a 3-level category tree, brands that
concentrate in a few categories, lognormal prices per category; users who
arrive over the days (first event `signup`), with Dirichlet interests over
categories that drift daily. Each active user has 1-3 sessions; a session is a
funnel of views -> cart -> purchase, with clicks, favourites, searches, logins.
The pipeline's troubles are built in: late deliveries (<= 5 days), duplicate
deliveries (same event_id), and malformed rows of five kinds.

Everything is vectorised with numpy and written day by day, so 10M events need
memory for about one day of them. Same arguments -> identical files.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userformer.jobs.core.config import Config
from userformer.jobs.core.dates import date_arg, date_range
from userformer.jobs.core.errors import UserError
from userformer.schemas.tables import RAW_EVENTS, RAW_ITEMS

# ---------------------------------------------------------------- catalogue
# line -> category -> 5 subcategories (8 x 6 x 5 = 240 leaves).
TREE: dict[str, dict[str, tuple[str, ...]]] = {
    "beauty": {
        "skincare": ("cleansers", "moisturisers", "serums", "sunscreen", "face masks"),
        "makeup": ("foundation", "lipstick", "mascara", "eyeshadow", "blush"),
        "haircare": ("shampoo", "conditioner", "hair oil", "styling", "hair colour"),
        "fragrance": ("perfume", "eau de toilette", "body mist", "cologne", "gift sets"),
        "bath & body": ("shower gel", "body lotion", "soap", "bath salts", "deodorant"),
        "nails": ("nail polish", "nail care", "false nails", "nail tools", "remover"),
    },
    "fashion": {
        "dresses": ("maxi dresses", "mini dresses", "evening dresses", "shirt dresses", "summer dresses"),
        "tops": ("t-shirts", "blouses", "shirts", "sweaters", "hoodies"),
        "trousers": ("jeans", "chinos", "leggings", "shorts", "joggers"),
        "shoes": ("sneakers", "boots", "sandals", "heels", "loafers"),
        "bags": ("handbags", "backpacks", "totes", "wallets", "suitcases"),
        "accessories": ("belts", "scarves", "hats", "sunglasses", "jewellery"),
    },
    "electronics": {
        "phones": ("smartphones", "phone cases", "chargers", "screen protectors", "power banks"),
        "computers": ("laptops", "monitors", "keyboards", "mice", "tablets"),
        "audio": ("headphones", "earbuds", "speakers", "soundbars", "microphones"),
        "cameras": ("mirrorless cameras", "lenses", "action cameras", "tripods", "drones"),
        "tv": ("televisions", "projectors", "streaming devices", "tv mounts", "remotes"),
        "wearables": ("smartwatches", "fitness trackers", "smart rings", "watch straps", "vr headsets"),
    },
    "home": {
        "furniture": ("sofas", "chairs", "tables", "beds", "shelves"),
        "kitchen": ("cookware", "knives", "small appliances", "tableware", "storage jars"),
        "bedding": ("duvets", "pillows", "sheets", "blankets", "mattress toppers"),
        "decor": ("candles", "vases", "frames", "rugs", "mirrors"),
        "lighting": ("lamps", "ceiling lights", "led strips", "smart bulbs", "outdoor lights"),
        "garden": ("plants", "planters", "garden tools", "bbq", "garden furniture"),
    },
    "sports": {
        "running": ("running shoes", "running shorts", "running jackets", "hydration packs", "gps watches"),
        "fitness": ("dumbbells", "yoga mats", "resistance bands", "kettlebells", "protein"),
        "cycling": ("bikes", "helmets", "bike lights", "cycling jerseys", "bike locks"),
        "outdoor": ("tents", "sleeping bags", "hiking boots", "rucksacks", "camping stoves"),
        "team sports": ("footballs", "basketballs", "tennis rackets", "shin guards", "team jerseys"),
        "swimming": ("swimsuits", "goggles", "swim caps", "beach towels", "fins"),
    },
    "toys": {
        "building": ("building blocks", "construction sets", "marble runs", "magnetic tiles", "model kits"),
        "dolls": ("fashion dolls", "baby dolls", "doll houses", "action figures", "plush"),
        "puzzles": ("jigsaws", "3d puzzles", "brain teasers", "floor puzzles", "puzzle mats"),
        "games": ("board games", "card games", "party games", "strategy games", "family games"),
        "outdoor play": ("trampolines", "scooters", "water toys", "sandpits", "swings"),
        "baby": ("rattles", "teethers", "activity gyms", "bath toys", "mobiles"),
    },
    "grocery": {
        "snacks": ("crisps", "nuts", "crackers", "popcorn", "protein bars"),
        "drinks": ("juice", "soda", "sparkling water", "energy drinks", "plant milk"),
        "coffee & tea": ("coffee beans", "ground coffee", "coffee capsules", "green tea", "herbal tea"),
        "pantry": ("pasta", "rice", "olive oil", "sauces", "spices"),
        "breakfast": ("cereal", "granola", "oats", "jam", "honey"),
        "sweets": ("chocolate", "gummies", "biscuits", "candy", "ice cream"),
    },
    "books": {
        "fiction": ("crime", "romance", "fantasy", "science fiction", "literary fiction"),
        "non-fiction": ("biography", "history", "popular science", "self-help", "business"),
        "children": ("picture books", "early readers", "young adult", "activity books", "bedtime stories"),
        "comics": ("manga", "graphic novels", "superheroes", "comic strips", "webcomics"),
        "cooking": ("baking", "vegetarian", "world cuisine", "quick meals", "desserts"),
        "travel": ("guidebooks", "maps", "travel writing", "phrasebooks", "atlases"),
    },
}
# Median price per line; categories vary around it.
LINE_PRICE = {
    "beauty": 20.0,
    "fashion": 45.0,
    "electronics": 180.0,
    "home": 60.0,
    "sports": 50.0,
    "toys": 25.0,
    "grocery": 6.0,
    "books": 14.0,
}

L1_NAMES = list(TREE)
L2_NAMES = [c for line in TREE.values() for c in line]
L3_NAMES = [s for line in TREE.values() for subs in line.values() for s in subs]
N_L1, N_L2, N_L3 = len(L1_NAMES), len(L2_NAMES), len(L3_NAMES)
N2, N3 = N_L2 // N_L1, N_L3 // N_L2  # categories per line, subcategories per category
assert all(len(c) == N2 and all(len(s) == N3 for s in c.values()) for c in TREE.values()), "tree must be regular"
# Search queries are category names at any level: l1 names, then l2, then l3.
QUERY_NAMES = pa.array(L1_NAMES + L2_NAMES + L3_NAMES, pa.string())

# ---------------------------------------------------------------- behaviour
EVENT_TYPES = ["view", "click", "cart", "purchase", "favourite", "search", "login", "signup"]
VIEW, CLICK, CART, PURCHASE, FAVOURITE, SEARCH, LOGIN, SIGNUP = range(len(EVENT_TYPES))
ITEM_TYPES = EVENT_TYPES[:5]
# Misspellings a buggy client sends; ingest must reject them (they are lower case: ingest lower-cases).
BAD_TYPES = ["clck", "purchse", "vieww", "add-to-cart"]
SURFACES = ["home", "search", "pdp", "recs", "checkout", "app", "web"]
S_HOME, S_SEARCH, S_PDP, S_RECS, S_CHECKOUT, S_APP, S_WEB = range(len(SURFACES))

ZIPF = 1.1
NEW_ITEM_FRAC = 0.15  # items launched after the first day
NEW_USER_FRAC = 0.3  # users who sign up during the window
SESSIONS_P = np.array([0.55, 0.30, 0.15])  # 1, 2, 3 sessions per active user and day
P_LOGIN, P_SEARCH, P_GLOBAL = 0.3, 0.12, 0.25  # login at session start; step is a search; view from global popularity
P_CLICK, P_FAV, P_CART, P_BUY = 0.12, 0.03, 0.08, 0.35  # per view; P_BUY per cart
P_PRICE_CHANGE = 0.02  # per item and day
INTEREST_CONC = 3.0  # sum of the Dirichlet's alpha: small = few favourite categories
DRIFT = 0.03  # daily share of a fresh random interest mixed into each user's
LATE_DELAYS, LATE_P = np.array([1, 2, 3, 5]), np.array([0.80, 0.12, 0.06, 0.02])
P_DUP_NEXT = 0.2  # a duplicate arrives in the next drop instead of the same one
SESSION_GAP_S = 60.0  # at least this long between two sessions of a user
# Sessions start more in the evening than at night (UTC hour weights).
HOURS = np.array([2, 1, 1, 1, 1, 2, 3, 5, 6, 6, 6, 6, 7, 6, 6, 6, 6, 7, 8, 9, 10, 10, 8, 5], float)
HOURS /= HOURS.sum()

_EVENTS_PER_VIEW = 1 + P_CLICK + P_FAV + P_CART * (1 + P_BUY)
_EVENTS_PER_STEP = P_SEARCH + (1 - P_SEARCH) * _EVENTS_PER_VIEW
_SESSIONS_MEAN = float(SESSIONS_P @ np.arange(1, len(SESSIONS_P) + 1))
US_PER_DAY = 86_400_000_000

# Row columns kept as numpy arrays until a drop is written (-1 / NaN = null).
# g: index of the day the event happened, n: its number that day (event_id = both).
_COLS = ("g", "n", "user", "ts", "etype", "item", "surface", "dur", "value", "query")


def _take(rows: dict, idx) -> dict:
    return {k: v[idx] for k, v in rows.items()}


def _concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in _COLS}


def _round_price(p: np.ndarray) -> np.ndarray:
    return np.maximum(0.99, np.floor(p) + 0.99)


def _ids(prefix: str, n: int) -> pa.Array:
    width = max(7, len(str(max(n - 1, 0))))
    return pc.binary_join_element_wise(
        prefix, pc.utf8_lpad(pc.cast(pa.array(np.arange(n)), pa.string()), width, padding="0"), ""
    )


def _dirichlet_rows(rng, alpha: np.ndarray, n: int) -> np.ndarray:
    g = rng.standard_gamma(alpha, size=(n, len(alpha)), dtype=np.float32) + np.float32(1e-12)
    return g / g.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- the world
@dataclass
class _World:
    """What persists across days: the catalogue and the users."""

    item_ids: pa.Array
    item_leaf: np.ndarray  # leaf category index 0..N_L3-1
    item_l2: np.ndarray
    item_launch: np.ndarray  # day index of launch, ascending with the id
    item_pop: np.ndarray  # Zipf weight
    price: np.ndarray  # current price
    item_brand: np.ndarray
    brand_names: pa.Array
    titles: pa.Array
    l2_order: np.ndarray  # items sorted by l2 category (for per-category sampling)
    l2_lo: np.ndarray  # each category's range in l2_order
    l2_hi: np.ndarray
    user_ids: pa.Array
    user_arrive: np.ndarray  # day index of signup, -1 = existed before the window; ascending
    user_prop: np.ndarray  # activity propensity, mean 1
    user_mix: np.ndarray  # (users, N_L2) float32 interest over categories
    alpha: np.ndarray  # Dirichlet parameter of interests (popular categories get more)


def _brand_names(rng, n: int) -> pa.Array:
    a = pa.array(
        [
            "lu",
            "ve",
            "ka",
            "zo",
            "mi",
            "ar",
            "no",
            "tri",
            "bel",
            "sa",
            "fe",
            "ori",
            "pa",
            "qui",
            "ro",
            "ta",
            "ex",
            "ul",
            "vi",
            "da",
        ]
    )
    b = pa.array(["ra", "ni", "lo", "me", "xa", "te", "vo", "li", "ce", "mo", "ssa", "dri"])
    c = pa.array(["", "x", "n", "ra", "lia", "ro", "ly", "ix", "on", "a", "is", "era"])
    names = pc.utf8_capitalize(
        pc.binary_join_element_wise(
            pc.take(a, rng.integers(0, len(a), n)),
            pc.take(b, rng.integers(0, len(b), n)),
            pc.take(c, rng.integers(0, len(c), n)),
            "",
        )
    )
    # Brand names must be distinct: repeats get their number appended.
    arr = np.asarray(names.to_numpy(zero_copy_only=False), dtype=object)
    _, first = np.unique(arr, return_index=True)
    rep = np.ones(n, bool)
    rep[first] = False
    if rep.any():
        suffix = pc.cast(pa.array(np.flatnonzero(rep)), pa.string())
        arr[rep] = np.asarray(
            pc.binary_join_element_wise(pa.array(arr[rep], pa.string()), suffix, " ").to_numpy(zero_copy_only=False)
        )
    return pa.array(arr, pa.string())


def _build_world(rng, users: int, items: int, days: int) -> _World:
    # Items: ids ascend with launch day, so later launches have higher ids.
    n_init = items if days == 1 else max(1, round(items * (1 - NEW_ITEM_FRAC)))
    launch = np.zeros(items, np.int64)
    launch[n_init:] = np.sort(rng.integers(1, max(days, 2), items - n_init))
    leaf_w = rng.dirichlet(np.full(N_L3, 2.0))
    leaf = rng.choice(N_L3, items, p=leaf_w)
    l2 = leaf // N3
    pop = (rng.permutation(items) + 1.0) ** -ZIPF
    line_price = np.array([LINE_PRICE[n] for n in L1_NAMES])
    cat_median = line_price[np.arange(N_L2) // N2] * rng.lognormal(0.0, 0.4, N_L2)
    price = _round_price(rng.lognormal(np.log(cat_median[l2]), 0.5))

    # Brands (~items/20), each at home in one category and often a sibling one.
    n_brands = max(1, round(items / 20))
    cat_w = leaf_w.reshape(N_L2, N3).sum(axis=1)
    home = rng.choice(N_L2, n_brands, p=cat_w)
    sib = home // N2 * N2 + rng.integers(0, N2, n_brands)
    has_sib = rng.random(n_brands) < 0.6
    pair_brand = np.concatenate([np.arange(n_brands), np.flatnonzero(has_sib)])
    pair_cat = np.concatenate([home, sib[has_sib]])
    o = np.argsort(pair_cat, kind="stable")
    pair_brand, pair_cat = pair_brand[o], pair_cat[o]
    lo, hi = np.searchsorted(pair_cat, l2, "left"), np.searchsorted(pair_cat, l2, "right")
    pick = np.minimum(lo + (rng.random(items) * (hi - lo)).astype(np.int64), len(pair_brand) - 1)
    stray = (hi == lo) | (rng.random(items) < 0.05)  # no brand at home there, or an odd one out
    brand = np.where(stray, rng.integers(0, n_brands, items), pair_brand[pick])
    brand_names = _brand_names(rng, n_brands)

    adjectives = pa.array(
        [
            "classic",
            "essential",
            "premium",
            "everyday",
            "pro",
            "eco",
            "deluxe",
            "mini",
            "ultra",
            "signature",
            "soft",
            "bold",
        ]
    )
    titles = pc.binary_join_element_wise(
        pc.take(brand_names, brand),
        pc.take(adjectives, rng.integers(0, len(adjectives), items)),
        pc.take(pa.array(L3_NAMES), leaf),
        pc.cast(pa.array(rng.integers(100, 1000, items)), pa.string()),
        " ",
    )

    l2_order = np.argsort(l2, kind="stable")
    l2_sorted = l2[l2_order]
    cats = np.arange(N_L2)

    # Users: ids ascend with arrival; new ones spread over the window.
    n_new = round(users * NEW_USER_FRAC)
    arrive = np.concatenate([np.full(users - n_new, -1), np.sort(rng.integers(0, days, n_new))])
    alpha = INTEREST_CONC * cat_w
    return _World(
        item_ids=_ids("i", items),
        item_leaf=leaf,
        item_l2=l2,
        item_launch=launch,
        item_pop=pop,
        price=price,
        item_brand=brand,
        brand_names=brand_names,
        titles=titles,
        l2_order=l2_order,
        l2_lo=np.searchsorted(l2_sorted, cats, "left"),
        l2_hi=np.searchsorted(l2_sorted, cats, "right"),
        user_ids=_ids("u", users),
        user_arrive=arrive,
        user_prop=rng.gamma(2.0, 0.5, users),
        user_mix=_dirichlet_rows(rng, alpha, users),
        alpha=alpha,
    )


def _items_table(w: _World, idx: np.ndarray) -> pa.Table:
    leaf = w.item_leaf[idx]
    return pa.table(
        {
            "item_id": pc.take(w.item_ids, idx),
            "category_l1": pc.take(pa.array(L1_NAMES), leaf // (N2 * N3)),
            "category_l2": pc.take(pa.array(L2_NAMES), leaf // N3),
            "category_l3": pc.take(pa.array(L3_NAMES), leaf),
            "brand": pc.take(w.brand_names, w.item_brand[idx]),
            "title": pc.take(w.titles, idx),
            "price": pa.array(w.price[idx], pa.float64()),
        },
        schema=RAW_ITEMS,
    )


class _ItemSampler:
    """Draws items by popularity among those launched by day d: globally or within a category."""

    def __init__(self, w: _World, d: int):
        self.weight = w.item_pop * (w.item_launch <= d)
        self.gcum = np.cumsum(self.weight)
        self.order = w.l2_order
        self.ccum = np.cumsum(self.weight[w.l2_order])
        self.hi = w.l2_hi
        top = np.where(w.l2_hi > 0, self.ccum[np.maximum(w.l2_hi - 1, 0)], 0.0)
        self.base = np.where(w.l2_lo > 0, self.ccum[np.maximum(w.l2_lo - 1, 0)], 0.0)
        self.total = top - self.base

    def global_(self, rng, n: int) -> np.ndarray:
        pos = np.searchsorted(self.gcum, rng.random(n) * self.gcum[-1], "right")
        return np.minimum(pos, len(self.gcum) - 1)

    def in_category(self, rng, cats: np.ndarray) -> np.ndarray:
        target = self.base[cats] + rng.random(len(cats)) * self.total[cats]
        pos = np.clip(np.searchsorted(self.ccum, target, "right"), 0, np.maximum(self.hi[cats] - 1, 0))
        out = self.order[pos]
        # Empty category (nothing launched there yet) or a float edge case: fall back to global popularity.
        bad = (self.total[cats] <= 0) | (self.weight[out] <= 0)
        out[bad] = self.global_(rng, int(bad.sum()))
        return out


def _pick_rows(rng, mix: np.ndarray, rows: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """One category per row of `rows`, drawn from that user's interest mixture."""
    out = np.empty(len(rows), np.int64)
    for lo in range(0, len(rows), chunk):
        cdf = np.cumsum(mix[rows[lo : lo + chunk]], axis=1)
        u = rng.random(len(cdf)) * cdf[:, -1]
        out[lo : lo + chunk] = (cdf < u[:, None]).sum(axis=1)
    return np.minimum(out, mix.shape[1] - 1)


def _drift(rng, w: _World, n: int, chunk: int = 200_000) -> None:
    """Move the interests of the first n users (those who exist) a little towards a fresh random one."""
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        w.user_mix[lo:hi] *= np.float32(1 - DRIFT)
        w.user_mix[lo:hi] += np.float32(DRIFT) * _dirichlet_rows(rng, w.alpha, hi - lo)


# ------------------------------------------------------------------ a day
def _day_events(rng, w: _World, d: int, day_us: int, active_frac: float, events_per_user: float) -> dict:
    """The events that happen on day index d, sorted by time, numbered 0..N-1."""
    exists = w.user_arrive <= d
    new = w.user_arrive == d
    active = (exists & (rng.random(len(exists)) < np.minimum(1.0, active_frac * w.user_prop))) | new
    act = np.flatnonzero(active)

    # Sessions: user, signup/login, focus category, number of steps.
    n_sess = rng.choice(len(SESSIONS_P), size=len(act), p=SESSIONS_P) + 1
    s_user = np.repeat(act, n_sess)
    S = len(s_user)
    s_first = np.zeros(S, bool)
    s_first[np.cumsum(n_sess) - n_sess] = True
    s_signup = s_first & new[s_user]
    s_login = ~s_signup & (rng.random(S) < P_LOGIN)
    s_device = np.where(rng.random(S) < 0.7, S_APP, S_WEB)
    s_cat = _pick_rows(rng, w.user_mix, s_user)
    # Steps per session (heavy-tailed) so that an active user makes ~events_per_user events.
    extra = max(0.0, (events_per_user / _SESSIONS_MEAN - P_LOGIN) / _EVENTS_PER_STEP - 1)
    steps = 1 + (rng.negative_binomial(2, 2 / (2 + extra), S) if extra > 0 else np.zeros(S, np.int64))

    # Steps: a search or a view, one after the other; t is the time a step takes.
    P = int(steps.sum())
    st_sess = np.repeat(np.arange(S), steps)
    st_first = np.cumsum(steps) - steps
    st_pos = np.arange(P) - np.repeat(st_first, steps)
    search = rng.random(P) < P_SEARCH
    after_search = np.zeros(P, bool)
    after_search[1:] = search[:-1]
    after_search &= st_pos > 0
    dwell = np.where(
        search, np.clip(rng.lognormal(np.log(6), 0.5, P), 1, 120), np.clip(rng.lognormal(np.log(15), 1.0, P), 0.5, 1800)
    )
    t = dwell + rng.lognormal(np.log(4), 0.8, P)
    excl = np.cumsum(t) - t
    prefix = np.where(s_signup | s_login, rng.lognormal(np.log(3), 0.5, S), 0.0)
    st_off = excl - np.repeat(excl[st_first], steps) + prefix[st_sess]
    last = st_first + steps - 1
    s_checkout = st_off[last] + t[last] + rng.lognormal(np.log(20), 0.5, S)

    # Views: where they happen and which item.
    vi = np.flatnonzero(~search)
    V = len(vi)
    v_sess, v_off, v_dwell = st_sess[vi], st_off[vi], dwell[vi]
    v_global = ~after_search[vi] & (rng.random(V) < P_GLOBAL)
    v_surface = np.where(
        after_search[vi],
        S_SEARCH,
        np.where(
            v_global,
            np.where(rng.random(V) < 0.5, S_HOME, S_RECS),
            rng.choice([S_PDP, S_RECS, S_HOME], V, p=[0.6, 0.25, 0.15]),
        ),
    )
    sampler = _ItemSampler(w, d)
    v_item = np.empty(V, np.int64)
    v_item[v_global] = sampler.global_(rng, int(v_global.sum()))
    v_item[~v_global] = sampler.in_category(rng, s_cat[v_sess[~v_global]])

    # The funnel: within a view's dwell a click, favourite or cart; carts bought at checkout.
    click = rng.random(V) < P_CLICK
    fav = rng.random(V) < P_FAV
    cart = rng.random(V) < P_CART
    buy = cart & (rng.random(V) < P_BUY)
    buy_off = s_checkout[v_sess[buy]] + rng.uniform(0, 30, int(buy.sum()))

    # Queries name the session's category at some level.
    si = np.flatnonzero(search)
    sc = s_cat[st_sess[si]]
    r = rng.random(len(si))
    query = np.where(
        r < 0.6, N_L1 + N_L2 + sc * N3 + rng.integers(0, N3, len(si)), np.where(r < 0.9, N_L1 + sc, sc // N2)
    )

    pi = np.flatnonzero(s_signup | s_login)
    nan = np.nan
    parts = [  # (session, offset, type, item, surface, duration, value, query)
        (pi, np.zeros(len(pi)), np.where(s_signup[pi], SIGNUP, LOGIN), -1, s_device[pi], nan, nan, -1),
        (st_sess[si], st_off[si], SEARCH, -1, S_SEARCH, nan, nan, query),
        (v_sess, v_off, VIEW, v_item, v_surface, v_dwell, nan, -1),
        (v_sess[click], v_off[click] + 0.3 * v_dwell[click], CLICK, v_item[click], v_surface[click], nan, nan, -1),
        (v_sess[fav], v_off[fav] + 0.6 * v_dwell[fav], FAVOURITE, v_item[fav], v_surface[fav], nan, nan, -1),
        (v_sess[cart], v_off[cart] + 0.9 * v_dwell[cart], CART, v_item[cart], S_PDP, nan, nan, -1),
        (v_sess[buy], buy_off, PURCHASE, v_item[buy], S_CHECKOUT, nan, w.price[v_item[buy]], -1),
    ]
    cols = [np.concatenate([np.broadcast_to(np.asarray(p[j]), len(p[0])) for p in parts]) for j in range(8)]
    sess, off, etype, item, surface, dur, value, qry = cols

    # Place a user's sessions in the day one after the other (so the signup session comes first),
    # near diurnal start times; the rare session too long for its share of the day is squeezed.
    s_n = np.repeat(n_sess, n_sess)
    s_pos = np.arange(S) - np.repeat(np.cumsum(n_sess) - n_sess, n_sess)
    span = s_checkout + 30.0
    scale = np.minimum(1.0, (86_400.0 / s_n - 2 * SESSION_GAP_S) / span)
    need = span * scale + SESSION_GAP_S  # a session plus the pause after it
    need_cum = np.cumsum(need)
    user_end = np.repeat(need_cum[np.cumsum(n_sess) - 1], n_sess)
    rest = user_end - (need_cum - need)  # this session and the user's later ones
    cand = rng.choice(24, S, p=HOURS) * 3600.0 + rng.random(S) * 3600.0
    cand = cand[np.lexsort((cand, s_user))]  # sessions of a user are contiguous: sort each user's starts
    start, end = np.empty(S), np.zeros(S)
    for k in range(len(SESSIONS_P)):
        m = np.flatnonzero(s_pos == k)
        after_prev = end[m - 1] + SESSION_GAP_S if k else 0.0
        start[m] = np.minimum(np.maximum(cand[m], after_prev), 86_400.0 - rest[m])
        end[m] = start[m] + span[m] * scale[m]
    ts = day_us + ((start[sess] + off * scale[sess]) * 1e6).astype(np.int64)

    o = np.argsort(ts, kind="stable")
    N = len(o)
    return {
        "g": np.full(N, d, np.int32),
        "n": np.arange(N, dtype=np.int64),
        "user": s_user[sess][o],
        "ts": ts[o],
        "etype": etype[o].astype(np.int16),
        "item": item[o].astype(np.int64),
        "surface": surface[o].astype(np.int16),
        "dur": dur[o].astype(np.float64),
        "value": value[o].astype(np.float64),
        "query": qry[o].astype(np.int32),
    }


def _malformed(rng, rows: dict, count: int, day_us: int, bad_types: list[int]) -> dict:
    """`count` broken copies of random views of the day, each with one defect, the five kinds in turn."""
    views = np.flatnonzero(rows["etype"] == VIEW)
    if count == 0 or len(views) == 0:
        return _take(rows, np.zeros(0, np.int64))
    b = _take(rows, views[rng.integers(0, len(views), count)])
    b["n"] = len(rows["n"]) + np.arange(count)  # own ids: these are extra rows, not redeliveries
    kind = rng.permutation(np.arange(count) % 5)
    b["user"][kind == 0] = -1  # null user_id
    k = kind == 1
    b["etype"][k] = rng.choice(bad_types, int(k.sum()))  # unknown event_type
    k = kind == 2  # ts 2..30 days after the drop
    b["ts"][k] = day_us + rng.integers(2, 31, int(k.sum())) * US_PER_DAY + rng.integers(0, US_PER_DAY, int(k.sum()))
    b["item"][kind == 3] = -1  # a view without item_id
    k = kind == 4
    b["dur"][k] = -np.abs(b["dur"][k]) - 1.0  # negative duration
    return b


def _events_table(rows: dict, w: _World, prefixes: pa.Array, type_names: pa.Array) -> pa.Table:
    def opt(values, idx):  # -1 -> null
        return pc.take(values, pa.array(idx, mask=idx < 0))

    def num(x):
        return pa.array(x, pa.float64(), mask=np.isnan(x))

    return pa.table(
        {
            "event_id": pc.binary_join_element_wise(
                pc.take(prefixes, rows["g"]), pc.cast(pa.array(rows["n"]), pa.string()), ""
            ),
            "user_id": opt(w.user_ids, rows["user"]),
            "ts": pa.array(rows["ts"], RAW_EVENTS.field("ts").type),
            "event_type": pc.take(type_names, rows["etype"]),
            "item_id": opt(w.item_ids, rows["item"]),
            "surface": opt(pa.array(SURFACES), rows["surface"]),
            "duration_s": num(rows["dur"]),
            "value": num(rows["value"]),
            "query": opt(QUERY_NAMES, rows["query"]),
        },
        schema=RAW_EVENTS,
    )


READY_MARKER = "_SUCCESS"  # pipeline.ready_marker's default


def _write(table: pa.Table, path: Path) -> None:
    """Write via a hidden temporary name and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------- main
def _check_args(cfg: Config, users, items, days, seed, rates: dict, active_frac, events_per_user) -> None:
    for name, v in (("users", users), ("items", items), ("days", days)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise UserError(f"--{name} must be a positive integer, got {v!r}")
    if days > 3650:
        raise UserError(f"--days must be at most 3650, got {days}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed!r}")
    for name, v in rates.items():
        if not 0.0 <= v <= 1.0:
            raise UserError(f"--{name} must be in [0, 1], got {v!r}")
    if not 0.0 < active_frac <= 1.0:
        raise UserError(f"--active-frac must be in (0, 1], got {active_frac!r}")
    if not events_per_user > 0:
        raise UserError(f"--events-per-user must be positive, got {events_per_user!r}")
    ic = cfg.ingest
    missing = [t for t in ITEM_TYPES if t not in ic.item_event_types] + [
        t for t in EVENT_TYPES[5:] if t not in ic.non_item_event_types
    ]
    if missing:
        raise UserError(
            f"the generator emits event types the config does not know as such: {missing} "
            "(see ingest.item_event_types / ingest.non_item_event_types)"
        )


def generate(
    cfg: Config,
    *,
    users: int,
    items: int,
    days: int,
    start: dt.date,
    seed: int,
    out: Path | None = None,
    malformed_rate: float = 0.001,
    late_rate: float = 0.01,
    duplicate_rate: float = 0.005,
    active_frac: float = 0.3,
    events_per_active_user: float = 20.0,
) -> dict:
    """Write `days` raw drops (events + items) from `start` under `out` (default cfg.raw_root); return counts."""
    _check_args(
        cfg,
        users,
        items,
        days,
        seed,
        {"malformed-rate": malformed_rate, "late-rate": late_rate, "duplicate-rate": duplicate_rate},
        active_frac,
        events_per_active_user,
    )
    out = Path(out) if out is not None else cfg.raw_root
    dates = date_range(start, days)
    last = days - 1
    known = set(cfg.ingest.event_types)
    bad_names = [t for t in BAD_TYPES if t not in known]
    type_names = pa.array(EVENT_TYPES + bad_names, pa.string())
    bad_types = list(range(len(EVENT_TYPES), len(EVENT_TYPES) + len(bad_names))) or [VIEW]
    prefixes = pa.array([f"e{seed}-{d:%Y%m%d}-" for d in dates], pa.string())

    # Independent streams: the world, then one per day (a day's draws don't depend on other days').
    seeds = np.random.SeedSequence(seed).spawn(days + 1)
    w = _build_world(np.random.Generator(np.random.PCG64(seeds[0])), users, items, days)

    summary = {
        "out": str(out),
        "start": str(start),
        "days": days,
        "seed": seed,
        "users": users,
        "items": items,
        "events_total": 0,
        "generated": 0,
        "late": 0,
        "duplicates": 0,
        "malformed": 0,
        "users_new": int((w.user_arrive >= 0).sum()),
        "items_launched_later": int((w.item_launch > 0).sum()),
        "events_per_day": {},
        "items_per_day": {},
    }
    pending: dict[int, list[dict]] = {}
    for d, day in enumerate(dates):
        rng = np.random.Generator(np.random.PCG64(seeds[d + 1]))
        day_us = int((dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC).timestamp())) * 1_000_000

        # Catalogue drop: day 1 the whole launched catalogue; later the launches and price changes.
        if d == 0:
            changed = np.flatnonzero(w.item_launch == 0)
        else:
            n_exist = int((w.user_arrive < d).sum())  # arrival is ascending: existing users are a prefix
            _drift(rng, w, n_exist)
            moved = np.flatnonzero((w.item_launch < d) & (rng.random(items) < P_PRICE_CHANGE))
            w.price[moved] = _round_price(w.price[moved] * rng.lognormal(0.0, 0.15, len(moved)))
            changed = np.union1d(np.flatnonzero(w.item_launch == d), moved)
        items_path = out / "items" / f"dt={day}" / "items.parquet"
        if len(changed):
            _write(_items_table(w, changed), items_path)
        elif items_path.exists():
            items_path.unlink()  # a stale snapshot of an earlier run would add changes that never happened
        summary["items_per_day"][str(day)] = len(changed)

        rows = _day_events(rng, w, d, day_us, active_frac, events_per_active_user)
        N = len(rows["n"])
        # Late delivery: into a later drop (never past the window's last one).
        delay = np.minimum(LATE_DELAYS[rng.choice(len(LATE_DELAYS), N, p=LATE_P)], last - d)
        late = (rng.random(N) < late_rate) & (delay > 0)
        deliver = np.where(late, d + delay, d)
        # Duplicates: delivered again, mostly in the same drop, some in the next.
        dup = np.flatnonzero(rng.random(N) < duplicate_rate)
        dup_deliver = np.minimum(deliver[dup] + (rng.random(len(dup)) < P_DUP_NEXT), last)
        idx = np.concatenate([np.arange(N), dup])
        when = np.concatenate([deliver, dup_deliver])
        for k in np.unique(when):
            pending.setdefault(int(k), []).append(_take(rows, idx[when == k]))
        drop = _concat(pending.pop(d))
        bad = _malformed(rng, rows, int(rng.binomial(len(drop["n"]), malformed_rate)), day_us, bad_types)
        drop = _concat([drop, bad])
        drop = _take(drop, np.argsort(drop["ts"], kind="stable"))
        day_dir = out / "events" / f"dt={day}"
        (day_dir / READY_MARKER).unlink(missing_ok=True)
        _write(_events_table(drop, w, prefixes, type_names), day_dir / "part-00000.parquet")
        (day_dir / READY_MARKER).write_text("")  # written last, as a producer does: the drop is complete

        n_drop = len(drop["n"])
        summary["events_per_day"][str(day)] = n_drop
        summary["events_total"] += n_drop
        summary["generated"] += N
        summary["late"] += int(late.sum())
        summary["duplicates"] += len(dup)
        summary["malformed"] += len(bad["n"])
    return summary


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="write synthetic raw logs (events + item catalogue), one drop per day",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--users", type=int, required=True, metavar="N", help="users by the end of the window (30%% sign up during it)"
    )
    p.add_argument(
        "--items", type=int, required=True, metavar="N", help="items by the end of the window (15%% launch after day 1)"
    )
    p.add_argument("--days", type=int, required=True, metavar="N", help="number of daily drops")
    p.add_argument("--start", type=date_arg, required=True, metavar="YYYY-MM-DD", help="first drop date YYYY-MM-DD")
    p.add_argument(
        "--seed", type=int, required=True, metavar="N", help="random seed; the same arguments give identical files"
    )
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="output root (default: the config's raw_root)")
    p.add_argument(
        "--malformed-rate", type=float, metavar="R", default=0.001, help="share of broken rows per drop (default 0.001)"
    )
    p.add_argument(
        "--late-rate",
        type=float,
        metavar="R",
        default=0.01,
        help="share of events delivered 1-5 days late (default 0.01)",
    )
    p.add_argument(
        "--duplicate-rate",
        type=float,
        metavar="R",
        default=0.005,
        help="share of events delivered twice (default 0.005)",
    )
    p.add_argument(
        "--active-frac",
        type=float,
        metavar="F",
        default=0.3,
        help="share of existing users active per day (default 0.3)",
    )
    p.add_argument(
        "--events-per-user",
        type=float,
        metavar="F",
        default=20.0,
        help="mean events per active user and day (default 20)",
    )
    p.set_defaults(func=run)


def run(args, cfg: Config) -> int:
    t0 = time.perf_counter()
    s = generate(
        cfg,
        users=args.users,
        items=args.items,
        days=args.days,
        start=args.start,
        seed=args.seed,
        out=args.out,
        malformed_rate=args.malformed_rate,
        late_rate=args.late_rate,
        duplicate_rate=args.duplicate_rate,
        active_frac=args.active_frac,
        events_per_active_user=args.events_per_user,
    )
    print(
        f"wrote {s['events_total']} raw events in {s['days']} drops under {s['out']} "
        f"({time.perf_counter() - t0:.1f}s): late {s['late']}, duplicates {s['duplicates']}, "
        f"malformed {s['malformed']}; {s['users']} users ({s['users_new']} new), "
        f"{s['items']} items ({s['items_launched_later']} launched later)"
    )
    for day, n in s["events_per_day"].items():
        print(f"  dt={day}: {n:>9} events  {s['items_per_day'][day]:>7} item rows")
    return 0
