"""The HTML page in real headless Chromium (Debian's chromium, driven by chromium-driver).

The page only displays what the library computed, so every check compares what the
browser highlights with ``plan.group_ids()``.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from normlab.explain.demo import NOTE_2D, NOTE_3D
from normlab.explain.html import write_page
from normlab.explain.model import all_views, explain_array, random_input
from normlab.plan import make_plan
from tests.prerequisites import CHROMEDRIVER, CHROMIUM, missing_browser_parts

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
MISSING = missing_browser_parts()
if MISSING is not None and os.environ.get("NORMLAB_REQUIRE_BROWSER") == "1":
    # CI (.ci/run) sets it: there a missing browser is a failure, not a green run of skips
    pytest.fail(f"NORMLAB_REQUIRE_BROWSER=1, and the browser tests cannot run: {MISSING}", pytrace=False)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(MISSING is not None, reason=f"browser tests need Debian's chromium and chromium-driver: {MISSING}"),
]


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1440,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The note's 3-D and 2-D examples and a 4-D tensor, as explain writes them."""
    folder = tmp_path_factory.mktemp("pages")
    written = {}
    for name, x, selected in (("3d", NOTE_3D, "batch"), ("2d", NOTE_2D, "batch"),
                              ("4d", random_input((2, 4, 2, 3), seed=1), "group")):
        views = all_views(x)
        written[name] = (write_page(folder / f"{name}.html", views, selected).resolve().as_uri(), x, views)
    return written


def open_page(browser, pages, name):
    url, x, views = pages[name]
    browser.get(url)
    browser.get_log("browser")  # start each test with an empty log
    return x, views


def cells(browser):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, "#cells .cell")


def hover(browser, index):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    cell = browser.find_element(By.CSS_SELECTOR, f'#cells .cell[data-index="{index}"]')
    ActionChains(browser).move_to_element(cell).perform()


def highlighted(browser):
    from selenium.webdriver.common.by import By

    return {int(c.get_attribute("data-index")) for c in browser.find_elements(By.CSS_SELECTOR, "#cells .cell.hl")}


def switch_norm(browser, key):
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f'button.norm[data-norm="{key}"]').click()


def group_of(view, index):
    """The flat indices that share statistics with element ``index``, by the library's plan."""
    ids = make_plan(view.pattern, view.x.shape, **view.sizes).group_ids().ravel()
    return set(np.flatnonzero(ids == ids[index]).tolist())


def severe_errors(browser):
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.mark.parametrize("name", ["3d", "2d", "4d"])
def test_page_loads_without_javascript_errors(browser, pages, name):
    url, _, _ = pages[name]
    browser.get(url)
    hover(browser, 0)
    switch_norm(browser, "rms")
    assert severe_errors(browser) == []
    assert browser.execute_script("return document.querySelector('#legend li') !== null")


@pytest.mark.parametrize("name", ["3d", "2d", "4d"])
def test_page_has_one_cell_per_element(browser, pages, name):
    x, _ = open_page(browser, pages, name)
    found = sorted(int(c.get_attribute("data-index")) for c in cells(browser))
    assert found == list(range(x.size))


@pytest.mark.parametrize("index", [0, 4, 9, 11])
def test_hovering_a_cell_highlights_exactly_the_cells_of_its_group(browser, pages, index):
    x, views = open_page(browser, pages, "3d")
    hover(browser, index)
    assert highlighted(browser) == group_of(views[0], index)


def test_hovering_shows_the_value_group_mean_std_and_output(browser, pages):
    open_page(browser, pages, "2d")
    hover(browser, 3)  # the 3 at [1, 0]: the middle of feature 0
    info = browser.find_element("id", "info").text
    assert "feature 0" in info and "[1, 0]" in info
    assert "group mean\n3" in info and "group std\n0.8165" in info and "output\n0" in info


def test_switching_the_norm_changes_the_highlighted_set_as_the_plan_says(browser, pages):
    x, views = open_page(browser, pages, "3d")
    seen = {}
    for view in views:
        switch_norm(browser, view.key)
        hover(browser, 1)
        seen[view.key] = highlighted(browser)
        assert seen[view.key] == group_of(view, 1), view.key
        data_groups = [int(c.get_attribute("data-group")) for c in cells(browser)]
        assert data_groups == view.groups.ravel().tolist(), view.key
    assert seen["batch"] != seen["layer-vision"] != seen["layer"]
    assert severe_errors(browser) == []


def test_switching_the_norm_on_a_4d_tensor_follows_the_plan(browser, pages):
    x, views = open_page(browser, pages, "4d")
    for view in views:
        switch_norm(browser, view.key)
        hover(browser, 13)
        assert highlighted(browser) == group_of(view, 13), view.key


def test_clicking_a_cell_pins_its_group_while_the_mouse_moves_on(browser, pages):
    from selenium.webdriver.common.by import By

    x, views = open_page(browser, pages, "2d")
    browser.find_element(By.CSS_SELECTOR, '#cells .cell[data-index="0"]').click()
    hover(browser, 2)
    assert highlighted(browser) == group_of(views[0], 0)


def test_a_screenshot_of_the_demo_page_is_saved(browser, pages):
    ARTIFACTS.mkdir(exist_ok=True)
    open_page(browser, pages, "3d")
    hover(browser, 4)
    shot = ARTIFACTS / "explain-3d-batch.png"
    browser.save_screenshot(str(shot))
    switch_norm(browser, "group")
    open_page(browser, pages, "4d")
    hover(browser, 5)
    browser.save_screenshot(str(ARTIFACTS / "explain-4d-group.png"))
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hovering_a_claim_lights_up_the_cells_it_is_about(browser, pages):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    x, views = open_page(browser, pages, "2d")
    claims = browser.find_elements(By.CSS_SELECTOR, "#observations li[data-claim]")
    texts = [c.text for c in claims]
    k = next(i for i, t in enumerate(texts) if t.startswith("feature 1: 3 and 3"))
    ActionChains(browser).move_to_element(claims[k]).perform()
    assert highlighted(browser) == {1, 4}  # the two 3s of feature 1, at [0, 1] and [1, 1]


def test_the_cube_speaks_of_tokens_in_the_nlp_and_rms_views_and_of_channels_elsewhere(browser, pages):
    from selenium.webdriver.common.by import By

    open_page(browser, pages, "3d")
    labels = lambda: [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#tensor text.axis-label")]  # noqa: E731
    for key, channel_word in (("rms", "T · tokens"), ("batch", "C · channels"), ("layer", "T · tokens")):
        switch_norm(browser, key)
        assert channel_word in labels(), key
    assert severe_errors(browser) == []


def test_hovering_a_masked_out_cell_says_it_is_not_counted(browser, tmp_path):
    x = np.array([[4, 3, 2], [3, 3, 2], [2, 2, 2], [9, 7, 5]], dtype=np.float32)
    view = explain_array(x, "batch", mask=np.broadcast_to(np.array([[1], [1], [1], [0]], dtype=bool), x.shape))
    browser.get(write_page(tmp_path / "masked.html", all_views(x, view), "batch").resolve().as_uri())
    hover(browser, 9)  # the 9 of the padding row
    assert "counted\nno: masked out" in browser.find_element("id", "info").text
    hover(browser, 0)
    assert "counted\nyes" in browser.find_element("id", "info").text
    assert "9 of 12 counted" in browser.find_element("id", "mask-note").text
    assert severe_errors(browser) == []


def test_the_keyboard_lights_up_a_cells_group_pins_it_and_reaches_the_legend_and_the_claims(browser, pages):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    x, views = open_page(browser, pages, "2d")
    active = lambda: browser.execute_script("return document.activeElement.dataset.index ?? null")  # noqa: E731
    for _ in range(20):  # past the norm and input/normalized buttons to the first cell
        if active() is not None:
            break
        ActionChains(browser).send_keys(Keys.TAB).perform()
    assert active() == "0" and highlighted(browser) == group_of(views[0], 0)
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    assert "pinned" in browser.find_element("id", "info").text.lower()
    ActionChains(browser).send_keys(Keys.ENTER).perform()  # released
    browser.execute_script("document.querySelector('#legend li[data-group=\"2\"]').focus()")
    assert highlighted(browser) == group_of(views[0], 2)  # feature 2's column
    claims = browser.find_elements(By.CSS_SELECTOR, "#observations li[data-claim]")
    assert all(c.get_attribute("tabindex") == "0" for c in claims)
    k = next(i for i, c in enumerate(claims) if c.text.startswith("feature 1: 3 and 3"))
    browser.execute_script("arguments[0].focus()", claims[k])
    assert highlighted(browser) == {1, 4}
    browser.execute_script("document.activeElement.blur()")
    assert highlighted(browser) == set() and severe_errors(browser) == []


@pytest.mark.parametrize("data", [[[0.123456789, 0.2, 0.27654321], [1000001, -1000002, 3.5]],
                                  [[[0.123456789, 0.2, 0.27654321], [1000001, -1000002, 3.5]]]], ids=["grid", "cube"])
def test_every_number_fits_inside_its_cell_so_no_digit_hides_under_a_neighbour(browser, tmp_path, data):
    from selenium.webdriver.common.by import By

    x = np.array(data, np.float32)
    browser.get(write_page(tmp_path / "long.html", all_views(x), "batch").resolve().as_uri())
    overflowing = ("return Array.from(document.querySelectorAll('#cells .cell')).filter(c => "
                   "c.querySelector('text').getBBox().width > c.querySelector('polygon').getBBox().width)"
                   ".map(c => c.querySelector('text').textContent)")
    assert browser.execute_script(overflowing) == []
    browser.find_element(By.CSS_SELECTOR, '.toggle button[data-show="output"]').click()
    assert browser.execute_script(overflowing) == []
    assert severe_errors(browser) == []


@pytest.mark.parametrize("pattern, channel_word", [("b t [d]", "T · tokens"), ("[b t] d", "T · tokens"),
                                                   ("b c [s]", "C · channels")])
def test_the_cube_names_the_second_axis_of_a_custom_pattern_by_its_letter_as_the_legend_does(browser, tmp_path, pattern,
                                                                                              channel_word):
    from selenium.webdriver.common.by import By

    view = explain_array(NOTE_3D, pattern)
    browser.get(write_page(tmp_path / "custom.html", all_views(NOTE_3D, view), "custom").resolve().as_uri())
    labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#tensor text.axis-label")]
    assert channel_word in labels


def accessibility_tree(browser):
    """The nodes a screen reader reads (Chromium's own accessibility tree, ignored ones left out)."""
    nodes = browser.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
    return [n for n in nodes if not n.get("ignored")]


def test_a_screen_reader_reaches_every_cell_by_its_position_value_and_group_and_hears_the_cell_panel(browser, pages):
    # the picture was role="img", whose children a screen reader never reaches: the cells that
    # Tab lands on were silent, and so were the panel's updates
    x, views = open_page(browser, pages, "2d")
    tree = accessibility_tree(browser)
    buttons = {n["name"]["value"] for n in tree if n.get("role", {}).get("value") == "button" and "name" in n}
    assert "[1, 0] 3, feature 0" in buttons and "[2, 2] 2, feature 2" in buttons
    assert sum(name.startswith("[") for name in buttons) == x.size
    live = [p["value"]["value"] for n in tree for p in n.get("properties", []) if p["name"] == "live"]
    assert "polite" in live
    hover(browser, 3)
    switch_norm(browser, "layer")
    names = {n["name"]["value"] for n in accessibility_tree(browser) if "name" in n}
    assert "[1, 0] 3, sample 1" in names  # the same cell under layer norm
    cell = browser.find_element("css selector", '#cells .cell[data-index="3"]')
    cell.click()  # pinned: a toggle button, pressed
    assert cell.get_attribute("aria-pressed") == "true"
    cell.click()
    assert cell.get_attribute("aria-pressed") == "false"
    assert severe_errors(browser) == []


@pytest.mark.parametrize("name, keys, reached", [
    ("2d", ["ARROW_RIGHT"], 1), ("2d", ["ARROW_DOWN"], 3), ("2d", ["ARROW_DOWN", "ARROW_RIGHT", "ARROW_UP"], 1),
    ("2d", ["END"], 8), ("2d", ["ARROW_LEFT"], 0),  # (nothing left of the first cell)
    ("4d", ["ARROW_DOWN"], 1), ("4d", ["ARROW_RIGHT"], 6), ("4d", ["END", "HOME"], 0),  # 4d: 2x4x(2x3)
])
def test_the_picture_is_one_tab_stop_and_the_arrow_keys_move_among_its_cells(browser, pages, name, keys, reached):
    # every cell was a Tab stop: 4,096 Tabs to get past a 64x64 tensor to the legend
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    x, views = open_page(browser, pages, name)
    assert browser.execute_script("return document.querySelectorAll('#cells [tabindex=\"0\"]').length") == 1
    browser.execute_script("document.querySelector('#cells .cell[data-index=\"0\"]').focus()")
    for key in keys:
        ActionChains(browser).send_keys(getattr(Keys, key)).perform()
    active = lambda: browser.execute_script("return document.activeElement.dataset.index ?? null")  # noqa: E731
    shown = browser.execute_script("return document.querySelector('button.norm[aria-pressed=\"true\"]').dataset.norm")
    assert active() == str(reached) and highlighted(browser) == group_of(next(v for v in views if v.key == shown),
                                                                         reached)
    ActionChains(browser).send_keys(Keys.TAB).perform()  # out of the picture, to the legend
    assert active() is None and browser.execute_script("return document.activeElement.closest('#legend') !== null")
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
    assert active() == str(reached)  # back to the cell it left
    assert severe_errors(browser) == []


def test_the_sentence_under_a_segmented_pattern_says_that_the_segment_ids_split_its_groups(browser, tmp_path):
    """It said that elements differing only along the bracketed axes share one mean and std,
    where two such elements of different segments do not (the page's own groups, and
    normalize's statistics, split them); and nothing said that the other buttons take no ids."""
    import normlab

    x = np.array([[1, 2], [3, 4], [5, 7], [2, 2], [0, 9]], dtype=np.float32)
    ids = np.array([0, 0, 1, 1, 1])
    view = explain_array(x, "[n] c", segments=ids)
    browser.get(write_page(tmp_path / "segments.html", all_views(x, view), "custom").resolve().as_uri())
    hover(browser, 0)  # channel 0 of node 0: node 2, also channel 0, differs from it only along n
    _, mean, _ = normlab.normalize(x, "[n] c", segment_ids=ids, return_stats=True)
    assert mean[0, 0] != mean[1, 0] and 4 not in highlighted(browser)  # (another segment: not its group)
    sentence = browser.find_element("id", "pattern-explain").text
    assert "differ only along the axes in [ ] and carry the same segment id share one mean and one std" in sentence
    assert "the other buttons take none" in sentence
    switch_norm(browser, "batch")
    assert "segment" not in browser.find_element("id", "pattern-explain").text
    assert severe_errors(browser) == []
