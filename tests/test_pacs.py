"""The PACS path: `scripts/pacs.py` (Orthanc over DICOMweb, in its own loopback-only network namespace, and the
app on it), REST inference by SeriesInstanceUID, DICOM SEG results and saved labels in Orthanc, errors, and
OHIF's auto-segment button in headless Chromium (Debian's, driven by Playwright).

Needs Debian's orthanc, orthanc-dicomweb, orthanc-gdcm, socat and chromium (`make pacs` installs them; CI's
.ci/run too); without them these tests fail in CI and are skipped elsewhere."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from helpers import REPO, dciodvfy_errors, free_port, require_marker

TOOLS = ["/usr/sbin/Orthanc", "/usr/bin/socat", "/usr/bin/chromium",
         "/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/share/orthanc/plugins/libOrthancGdcm.so"]
ARTIFACTS = Path(os.environ.get("DELIGHTSAM_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, samples):
    require_marker("pacs", "Orthanc and the app on it")
    missing = [t for t in TOOLS if not Path(t).exists()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the PACS tests need {missing} (apt-get install orthanc orthanc-dicomweb orthanc-gdcm socat chromium)")
        pytest.skip(f"no {missing}: `make pacs` installs them")
    work = tmp_path_factory.mktemp("pacs")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    began = time.time()
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "pacs.py"), "--no-install", "--work", str(work),
                             "--port", str(free_port()), "--orthanc-port", str(free_port())],
                            stdout=open(work / "pacs.out", "w"), stderr=subprocess.STDOUT, env=env)
    ready = work / "ready.json"
    while not ready.exists():
        if proc.poll() is not None or time.time() - began > 300:
            proc.kill()
            pytest.fail(f"scripts/pacs.py did not come up:\n{(work / 'pacs.out').read_text()[-3000:]}\n"
                        f"{(work / 'monailabel.log').read_text()[-3000:] if (work / 'monailabel.log').exists() else ''}")
        time.sleep(1)
    info = json.loads(ready.read_text())
    info.update(work=work, startup_s=time.time() - began, timings={})
    yield info
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "pacs_timings.json").write_text(json.dumps({"startup_s": info["startup_s"], **info["timings"]}, indent=1))


def _infer(pacs, series: str, output: str = "image", model: str = "delightsam_ct", **params):
    return requests.post(f"{pacs['app']}/infer/{model}", params={"image": series, "output": output},
                         files={"params": (None, json.dumps(params))}, timeout=600)


def _qido(pacs, **query):
    return requests.get(f"{pacs['orthanc']}/dicom-web/series", params=query, timeout=30).json() or []


def _read_label(content: bytes, suffix: str, tmp: Path):
    import SimpleITK as sitk

    path = tmp / f"label{suffix}"
    path.write_bytes(content)
    return sitk.ReadImage(str(path))


@pytest.mark.pacs
def test_the_pacs_holds_two_studies_and_the_app_lists_ct_and_mr(pacs):
    assert {s["00080060"]["Value"][0] for s in _qido(pacs)} >= {"CT", "MR"}
    stats = requests.get(f"{pacs['app']}/datastore/", params={"output": "stats"}, timeout=30).json()
    assert stats["total"] == 2  # the CT and the MR series, no SEG


@pytest.mark.pacs
def test_infer_by_series_uid_takes_the_modality_from_the_series(pacs, tmp_path):
    import SimpleITK as sitk

    for kind, structures in (("ct", {"liver", "spleen"}), ("mr", {"brain"})):
        began = time.time()
        reply = _infer(pacs, pacs["series"][kind]["series"], "all", f"delightsam_{kind}", result_extension=".nrrd",
                       result_dtype="uint8")
        pacs["timings"][f"rest_first_infer_{kind}_s"] = time.time() - began
        assert reply.status_code == 200, reply.text
        parts = _multipart(reply)
        params = json.loads(parts["params"])
        assert params["modality"] == kind
        label = _read_label(parts["image"], ".nrrd", tmp_path)
        files = pacs["series"][kind]["files"]
        assert label.GetSize()[2] == files and label.GetPixelID() == sitk.sitkUInt8
        present = {n for n, i in params["structures"].items() if (sitk.GetArrayFromImage(label) == i).any()}
        assert structures <= present, present
    began = time.time()
    assert _infer(pacs, pacs["series"]["ct"]["series"], "json").status_code == 200
    pacs["timings"]["rest_warm_infer_ct_s"] = time.time() - began
    wrong = _infer(pacs, pacs["series"]["ct"]["series"], "json", "delightsam_mr")  # the series' tag says CT
    assert wrong.status_code == 422 and "use delightsam_ct" in wrong.json()["detail"], wrong.text


def _multipart(reply) -> dict[str, bytes]:
    from requests_toolbelt.multipart import decoder

    parts = {}
    for part in decoder.MultipartDecoder.from_response(reply).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        name = disposition.split("name=")[1].split(";")[0].strip('"')
        parts[name] = part.content if name != "params" else part.content.decode()
    return parts


@pytest.mark.pacs
def test_dicom_seg_output_names_and_codes_its_segments(pacs, tmp_path):
    """output=dicom_seg: monailabel wants label_info from the client; with the app's segment attributes the SEG
    that comes back references the series and names and codes each structure."""
    from delightsam_app.dicom_seg import segment_info

    import SimpleITK as sitk

    ct = pacs["series"]["ct"]["series"]
    first = _infer(pacs, ct, "all", result_extension=".nrrd", result_dtype="uint8")
    parts = _multipart(first)
    present = set(np.unique(sitk.GetArrayFromImage(_read_label(parts["image"], ".nrrd", tmp_path))).tolist()) - {0}
    # monailabel pairs label_info with the ids present in the label, in ascending order, by position
    structures = json.loads(parts["params"])["structures"]
    info = [segment_info(name, i) for name, i in sorted(structures.items(), key=lambda kv: kv[1]) if i in present]
    reply = _infer(pacs, ct, "dicom_seg", label_info=info)
    assert reply.status_code == 200, reply.text[:500]
    (tmp_path / "output.dcm").write_bytes(reply.content)
    assert dciodvfy_errors(tmp_path / "output.dcm") == []
    seg = pydicom.dcmread(io.BytesIO(reply.content))
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, len(seg.SegmentSequence) + 1))
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    known = {"liver": "10200004", "spleen": "78961009", "kidney_right": "9846003", "kidney_left": "18639004",
             "stomach": "69695003"}
    assert codes and all(known[name] == code for name, code in codes.items()), codes


def _seg_of(pacs, series_uid: str) -> pydicom.Dataset:
    study = _qido(pacs, SeriesInstanceUID=series_uid)[0]["0020000D"]["Value"][0]
    reply = requests.get(f"{pacs['orthanc']}/dicom-web/studies/{study}/series/{series_uid}",
                         headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=60)
    from requests_toolbelt.multipart import decoder

    return pydicom.dcmread(io.BytesIO(decoder.MultipartDecoder.from_response(reply).parts[0].content))


@pytest.mark.pacs
def test_saved_final_label_becomes_a_seg_in_the_pacs_and_training_data(pacs, tmp_path):
    import pydicom_seg
    import SimpleITK as sitk

    ct = pacs["series"]["ct"]["series"]
    reply = _infer(pacs, ct, "image", result_extension=".nii.gz", result_dtype="uint8")
    label_path = tmp_path / "final.nii.gz"
    label_path.write_bytes(reply.content)
    before = {s["0020000E"]["Value"][0] for s in _qido(pacs, Modality="SEG")}
    began = time.time()
    saved = requests.put(f"{pacs['app']}/datastore/label", params={"image": ct, "tag": "final"},
                         files={"label": ("final.nii.gz", label_path.read_bytes()),
                                "params": (None, json.dumps({"label_info": [{"name": "whatever"}]}))}, timeout=300)
    pacs["timings"]["save_final_seg_s"] = time.time() - began
    assert saved.status_code == 200, saved.text
    new = {s["0020000E"]["Value"][0] for s in _qido(pacs, Modality="SEG")} - before
    assert len(new) == 1
    seg = _seg_of(pacs, new.pop())
    seg.save_as(tmp_path / "saved.dcm")
    assert dciodvfy_errors(tmp_path / "saved.dcm") == []
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, len(seg.SegmentSequence) + 1))
    segments = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert segments.get("liver") == "10200004" and segments.get("spleen", "78961009") == "78961009"
    # voxel for voxel: the SEG read back equals the label that was saved
    decoded = pydicom_seg.MultiClassReader().read(seg).image
    expected = sitk.ReadImage(str(label_path))
    decoded = sitk.Resample(decoded, expected, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    got, want = sitk.GetArrayFromImage(decoded), sitk.GetArrayFromImage(expected)
    names = {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence}
    ids = json.loads(requests.get(f"{pacs['app']}/info/", timeout=30).text)["models"]["delightsam_ct"]["labels"]
    remapped = np.zeros_like(got)
    for number, name in names.items():
        remapped[got == number] = ids[name]
    np.testing.assert_array_equal(remapped, want)
    # the train task sees it: the datastore counts the series as labelled
    deadline = time.time() + 60  # until the datastore's DICOMweb listing cache expires (5 s here)
    while requests.get(f"{pacs['app']}/datastore/", params={"output": "stats"}, timeout=60).json()["completed"] < 1:
        assert time.time() < deadline, "the saved SEG never counted as a label"
        time.sleep(0.5)
    # and trains on it: the SEG, read back from the PACS, becomes a label map in the model's ids
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(pacs["app"], tmpdir=str(tmp_path))
    task = client.train_start("delightsam", {"max_epochs": 1, "steps_per_epoch": 1, "train_batch_size": 1,
                                             "teacher": "none", "tracking": "none", "val_split": 0})
    deadline = time.time() + 600
    # the state of this run (the status answers the latest task, an earlier one until this one registers)
    while (status := client.train_status()).get("id") != task["id"] or status["status"] in ("SUBMITTED", "RUNNING"):
        assert time.time() < deadline, status
        time.sleep(0.5)
    assert status["status"] == "DONE", status
    stats = client.info()["train_stats"]["delightsam"]
    assert stats["train_items"] == 1
    # it trains the structures the SEG names; the others are unknown to it, not absent
    assert set(stats["data"]["trained"][ct]["structures"]) == set(segments) and stats["data"]["refused"] == {}
    trained_on = sitk.ReadImage(str(pacs["work"] / "model" / "pacs_labels" / f"{ct}.nii.gz"))
    trained_on = sitk.Resample(trained_on, expected, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(trained_on), want)


def _upload_variant(pacs, tmp_path, name: str, change) -> str:
    """Four slices of the CT series with new UIDs and one change, uploaded to Orthanc (and kept in tmp_path/name);
    returns the series UID."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(entropy_srcs=["test-study", name]), generate_uid(entropy_srcs=["test", name])
    for i, f in enumerate(sorted((pacs["work"] / "series" / "ct").glob("*.dcm"))[:4]):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series  # a study of its own: the viewer's stays clean
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["test", name, str(i)])
        change(ds)
        out = io.BytesIO()
        ds.save_as(out, write_like_original=False)
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{i}.dcm").write_bytes(out.getvalue())
        _store(pacs, out.getvalue())
    return series


def _store(pacs, dicom: bytes) -> None:
    reply = requests.post(f"{pacs['orthanc']}/instances", data=dicom, headers={"Content-Type": "application/dicom"},
                          timeout=30)
    assert reply.status_code == 200, reply.text


def _upload_seg(pacs, tmp_path) -> str:
    """A DICOM SEG (a liver square on four CT slices, written by the app's own SEG writer) of a series of its own,
    uploaded to Orthanc; returns the SEG's series UID."""
    from delightsam.reading import read_volume
    from delightsam_app.dicom_seg import write_dicom_seg

    _upload_variant(pacs, tmp_path, "seg_source", lambda ds: None)
    files = sorted(str(f) for f in (tmp_path / "seg_source").glob("*.dcm"))
    image = read_volume(tmp_path / "seg_source")
    labels = np.zeros(tuple(image.shape), np.uint8)
    labels[100:200, 100:200, :] = 1
    seg = pydicom.dcmread(write_dicom_seg(files, labels, image.affine, {"liver": 1}, "test"))
    out = io.BytesIO()
    seg.save_as(out)
    _store(pacs, out.getvalue())
    return str(seg.SeriesInstanceUID)


@pytest.mark.pacs
def test_bad_series_get_clear_errors_and_the_server_goes_on(pacs, tmp_path):
    def not_ct_or_mr(ds):
        ds.Modality = "PT"

    def unsupported_syntax(ds):
        from pydicom.encaps import encapsulate

        # JPEG-LS lossless in name, raw bytes inside: a series the PACS stores but cannot decode or send
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].is_undefined_length = True

    cases = {
        "pet": (_upload_variant(pacs, tmp_path, "pet", not_ct_or_mr), 422, "has Modality PT"),
        "syntax": (_upload_variant(pacs, tmp_path, "syntax", unsupported_syntax), None, "could not"),
        "seg": (_upload_seg(pacs, tmp_path), 422, "is a DICOM SEG"),
    }
    for name, (series, status, text) in cases.items():
        reply = _infer(pacs, series, "json")
        print(name, reply.status_code, reply.text)
        assert reply.status_code >= 400, (name, reply.text)
        if status:
            assert reply.status_code == status, (name, reply.text)
        assert text in reply.json()["detail"], (name, reply.text)
        assert requests.get(f"{pacs['app']}/info/", timeout=30).status_code == 200
    log = (pacs["work"] / "monailabel.log").read_text()
    assert "has Modality PT" in log  # the server's log says it too


class Viewer:
    """OHIF in headless Chromium (Debian's, through Playwright), with every failed request recorded."""

    def __init__(self, playwright, pacs) -> None:
        self.pacs, self.failed = pacs, []
        self.context = playwright.chromium.launch_persistent_context(
            str(pacs["work"] / f"chromium-{time.time_ns()}"), executable_path="/usr/bin/chromium", headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"], viewport={"width": 1600, "height": 900})
        # the panel's server address (it would guess port 8000 of the page's host)
        self.context.add_cookies([{"name": "MONAILABEL_SERVER_URL", "value": pacs["app"] + "/", "url": pacs["app"]}])
        self.page = self.context.new_page()
        self.page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 and _counts(r.url) else None)
        self.page.on("requestfailed", lambda r: self.failed.append(f"failed {r.url}") if _counts(r.url) else None)

    def open_study(self, study: str, shots: str, images: bool = True) -> None:
        page = self.page
        page.goto(f"{self.pacs['app']}/ohif/", wait_until="domcontentloaded")
        page.locator(f'[data-cy="studyRow-{study}"]').wait_for(state="visible", timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / f"{shots}_01_study_list.png"))
        page.locator(f'[data-cy="{study}"]').first.click()
        page.locator(f'[data-cy="mode-monai-label-{study}"]').click()
        page.wait_for_url("**/ohif/monai-label?StudyInstanceUIDs=*")
        page.locator('[data-cy="viewport-pane"] canvas').first.wait_for(state="visible", timeout=120_000)
        if images:
            page.wait_for_function("""() => { const e = document.querySelector('[data-cy="viewport-overlay-bottom-right"]');
                                              return e && /\\d/.test(e.innerText || ''); }""", timeout=120_000)
            page.wait_for_load_state("networkidle")
        page.locator(".monaiLabelPanel").wait_for(state="visible", timeout=60_000)
        banner = page.locator('[data-cy="confirm-and-hide-button"]')
        if banner.count():
            banner.click()

    def run_auto_segmentation(self):
        page = self.page
        page.locator(".monaiLabelPanel table.settingsTable button.actionButton").click()  # Connect
        tab_label = page.locator("label.tab-label", has_text="Auto-Segmentation")
        tab_label.wait_for(state="visible", timeout=60_000)
        tab_label.click()
        tab = page.locator("div.tab", has=tab_label)
        tab.locator(".modelSelector select.selectBox").select_option("delightsam_ct")
        with page.expect_response(lambda r: "/infer/delightsam" in r.url, timeout=600_000) as infer:
            tab.locator('button.actionButton[title="Run Segmentation"]').click()
        return infer.value


# what OHIF holds after a run: its segments (index -> name) and the voxels of each index in its labelmap
DRAWN = """() => {
  const service = window.services.segmentationService;
  const segmentation = service.getSegmentation('1');
  const segments = {};
  for (const s of Object.values(segmentation.segments || {})) { if (s) segments[s.segmentIndex] = s.label; }
  const data = service.getLabelmapVolume('1').voxelManager.getCompleteScalarDataArray();
  const counts = {};
  for (let i = 0; i < data.length; i++) { const v = data[i]; if (v) counts[v] = (counts[v] || 0) + 1; }
  return {segments, counts};
}"""


DRAWN_ANY = """() => { const v = window.services.segmentationService.getLabelmapVolume('1');
  return !!v && v.voxelManager.getCompleteScalarDataArray().some((x) => x > 0); }"""


@pytest.mark.pacs
def test_ohif_auto_segment_button_draws_the_label(pacs, tmp_path):
    """OHIF's auto-segment button with delightsam_ct: the organs are drawn under their own names, with the
    voxel counts of the server's label (names from the model's own labels in /info, never another
    modality's)."""
    import SimpleITK as sitk
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        viewer = Viewer(p, pacs)
        try:
            began = time.time()
            viewer.open_study(pacs["series"]["ct"]["study"], "ohif_ct")
            pacs["timings"]["ui_open_study_s"] = time.time() - began
            viewport = viewer.page.locator('[data-cy="viewport-pane"]').first
            before, after = ARTIFACTS / "ohif_ct_02_viewer.png", ARTIFACTS / "ohif_ct_03_auto_segmentation.png"
            viewport.screenshot(path=str(before))
            began = time.time()
            assert viewer.run_auto_segmentation().status == 200
            viewer.page.get_by_text("Running Segmentation - Successful").wait_for(state="visible", timeout=120_000)
            pacs["timings"]["ui_infer_s"] = time.time() - began
            viewer.page.wait_for_function(DRAWN_ANY, timeout=60_000)  # the labelmap holds the result
            deadline = time.time() + 30
            while True:  # until the viewport shows it (the overlay is drawn over the organs)
                viewport.screenshot(path=str(after))
                if _changed_fraction(before, after) > 0.02 or time.time() > deadline:
                    break
            viewer.page.screenshot(path=str(ARTIFACTS / "ohif_ct_04_page.png"))
            drawn = viewer.page.evaluate(DRAWN)
        finally:
            viewer.context.close()
    changed = _changed_fraction(before, after)
    assert changed > 0.02, changed  # the label overlay is drawn over the organs
    assert not viewer.failed, viewer.failed
    # the same series through REST: voxels per structure name
    reply = _infer(pacs, pacs["series"]["ct"]["series"], "all", result_extension=".nrrd", result_dtype="uint8")
    parts = _multipart(reply)
    labels = sitk.GetArrayFromImage(_read_label(parts["image"], ".nrrd", tmp_path))
    expected = {name: int((labels == i).sum()) for name, i in json.loads(parts["params"])["structures"].items()}
    expected = {name: n for name, n in expected.items() if n}
    painted = {drawn["segments"][index]: n for index, n in drawn["counts"].items()}
    assert painted == expected, (painted, expected, drawn["segments"])
    assert "liver" in painted  # not a comparison of two empty maps


@pytest.mark.pacs
def test_ohif_toast_says_why_a_run_failed(pacs, tmp_path):
    """A series whose pixels the PACS cannot send: the toast carries the server's reason."""
    from playwright.sync_api import sync_playwright

    def undecodable(ds):
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS in name, raw bytes inside
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].is_undefined_length = True

    series = _upload_variant(pacs, tmp_path, "toast", undecodable)
    study = _qido(pacs, SeriesInstanceUID=series)[0]["0020000D"]["Value"][0]
    with sync_playwright() as p:
        viewer = Viewer(p, pacs)
        try:
            viewer.open_study(study, "ohif_error", images=False)
            assert viewer.run_auto_segmentation().status >= 400
            toast = viewer.page.get_by_text("Failed to Run Segmentation:")
            toast.wait_for(state="visible", timeout=60_000)
            text = toast.inner_text()
            viewer.page.screenshot(path=str(ARTIFACTS / "ohif_error_02_toast.png"))
        finally:
            viewer.context.close()
    assert series in text and "could not" in text, text
    assert requests.get(f"{pacs['app']}/info/", timeout=30).status_code == 200


def _counts(url: str) -> bool:
    """Requests whose failure matters (not the fonts an offline page cannot fetch, not OHIF's optional probes)."""
    harmless = ("fonts.googleapis", "fonts.gstatic", "android-chrome", "/train/?check_if_running", "favicon")
    return url.startswith("http://127.0.0.1") and not any(h in url for h in harmless)


def _changed_fraction(before: Path, after: Path) -> float:
    from PIL import Image

    a = np.asarray(Image.open(before).convert("RGB"), dtype=np.int32)
    b = np.asarray(Image.open(after).convert("RGB"), dtype=np.int32)
    return float((np.abs(a - b).sum(axis=-1) > 40).mean())


def test_a_pacs_that_never_answers_times_out():
    """A PACS that accepts a connection and then says nothing does not hold a request for ever."""
    import socket
    import threading

    from delightsam_app.pacs import TimeoutAdapter

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    session = requests.Session()
    session.mount("http://", TimeoutAdapter((2.0, 1.0)))
    began = time.time()
    with pytest.raises(requests.exceptions.ReadTimeout):
        session.get(f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web/series")
    assert time.time() - began < 10
    listener.close()


class PausingProxy:
    """A loopback TCP proxy in front of Orthanc that holds a series download still once ``after`` bytes of its
    body have passed (``tripped`` is set), until ``release`` is set: the moment to kill Orthanc mid-transfer,
    found by state rather than by timing. Holding it still keeps Orthanc blocked on its own send."""

    def __init__(self, upstream: str, after: int = 256 * 1024) -> None:
        import socket
        import threading

        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.after, self.tripped, self.release = after, threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client = self.listener.accept()[0]
            except OSError:
                return
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # little in flight while held still
            server.connect(self.upstream)
            state = {"series": False, "sent": 0}
            threading.Thread(target=self._pipe, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, state, False), daemon=True).start()

    def _pipe(self, source, target, state: dict, request: bool) -> None:
        import re
        import socket

        try:
            while data := source.recv(65536):
                if request and (line := re.match(rb"GET (\S+) HTTP", data)):  # keep-alive: one request at a time
                    state["series"] = re.search(rb"/studies/[^/]+/series/[^/?]+$", line.group(1).split(b"?")[0]) is not None
                    state["sent"] = 0
                elif not request and state["series"]:
                    state["sent"] += len(data)
                    if state["sent"] > self.after and not self.release.is_set():
                        self.tripped.set()
                        self.release.wait(120)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.mark.pacs
@pytest.mark.server
def test_orthanc_killed_mid_download_then_back(pacs, tmp_path):
    """Orthanc SIGKILLed while the app streams a series from it: a 502 naming the PACS, no partial series left
    in the cache, the server up (and a second app on Orthanc directly says the PACS did not answer); Orthanc
    restarted on the same storage: the same request succeeds with the whole series."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers import monailabel_server

    proxy = PausingProxy(pacs["orthanc"])
    cache = tmp_path / "dicomweb-cache"
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache), "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": '{"Modality": "MR"}'}
    mr = pacs["series"]["mr"]
    restarted = None
    try:
        with monailabel_server(tmp_path, f"{proxy.url}/dicom-web", ["--conf", "model_dir", str(tmp_path / "model")],
                               env=env) as app:
            proxied = {**pacs, "app": app}
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(_infer, proxied, mr["series"], "json", "delightsam_mr")
                assert proxy.tripped.wait(240), f"the series download never started: {pending.result().text}"
                os.killpg(pacs["orthanc_pid"], signal.SIGKILL)  # Orthanc, mid-transfer
                _wait_until(lambda: not _answers(pacs["orthanc"]), "Orthanc did not stop")
                proxy.release.set()
                reply = pending.result(timeout=300)
            assert reply.status_code == 502, reply.text
            detail = reply.json()["detail"]
            assert proxy.url in detail and "could not send series" in detail, detail
            assert not list(cache.rglob(f"{mr['series']}*"))  # nothing partial: neither the folder nor its NIfTI
            assert requests.get(f"{app}/info/", timeout=30).status_code == 200
            direct = _infer(pacs, mr["series"] + ".9", "json", "delightsam_mr")  # the fixture's app, uncached series
            assert direct.status_code == 502 and "did not answer" in direct.json()["detail"], direct.text
            assert requests.get(f"{pacs['app']}/info/", timeout=30).status_code == 200

            restarted = subprocess.Popen(pacs["orthanc_command"], stdout=open(tmp_path / "orthanc.log", "w"),
                                         stderr=subprocess.STDOUT, start_new_session=True)
            _wait_until(lambda: _answers(pacs["orthanc"]), "Orthanc did not come back")
            again = _infer(proxied, mr["series"], "all", "delightsam_mr", result_extension=".nrrd")
            assert again.status_code == 200, again.text
            label = _read_label(_multipart(again)["image"], ".nrrd", tmp_path)
            assert label.GetSize()[2] == mr["files"]  # every slice of the series
            copies = [d for d in cache.rglob(mr["series"]) if d.is_dir()]  # monailabel's cache/<hash>/<series>/
            assert [len(list(d.glob("*.dcm"))) for d in copies] == [mr["files"]]
    finally:
        proxy.close()
        if restarted is not None:
            os.killpg(restarted.pid, signal.SIGKILL)
            restarted.wait()


def _wait_until(condition, message: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, message
        time.sleep(0.2)


def _answers(url: str) -> bool:
    try:
        requests.get(f"{url}/system", timeout=2)
        return True
    except requests.RequestException:
        return False


class _CutDownload:
    """Stands in for monailabel's DICOMweb datastore where a transfer is cut exactly where a part ends (the Orthanc
    test above hits that only when the kill lands there): ``arrive`` instances are written, then the parse of the
    cut part fails (``fails``) or the shorter series is returned as if whole. The only stand-in in this file."""

    def __init__(self, root: Path, arrive: int, fails: Exception | None) -> None:
        from types import SimpleNamespace

        self.root, self.arrive, self.fails = root, arrive, fails
        self._client = SimpleNamespace(base_url="http://127.0.0.1:1/dicom-web")
        self._datastore = SimpleNamespace(image_path=lambda: str(root))

    def get_image_uri(self, series_uid: str) -> str:
        folder = self.root / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(self.arrive):
            (folder / f"{k}.dcm").write_bytes(b"DICM")
        if self.fails is not None:
            raise self.fails
        return str(folder)


@pytest.mark.parametrize("arrive, fails, status", [(7, KeyError("(0008, 0018)"), 502), (7, None, 502),
                                                   (25, ValueError("no image geometry"), 422), (25, None, 200)])
def test_a_series_that_did_not_all_come_is_the_pacs_failure(tmp_path, arrive, fails, status):
    """The PACS says the series holds 25 instances: fewer arrived (a parse error on the cut part, or a shorter
    series that reads) is a 502 naming the PACS, and nothing is kept; all arrived but unreadable is the image's
    fault (422); all arrived and readable is served."""
    from fastapi import HTTPException

    from delightsam_app.pacs import _download

    store = _CutDownload(tmp_path, arrive, fails)
    folder = str(tmp_path / "1.2.3")
    if status == 200:
        assert _download(store, "1.2.3", "MR", folder, expected=25) == folder
        return
    with pytest.raises(HTTPException) as raised:
        _download(store, "1.2.3", "MR", folder, expected=25)
    assert raised.value.status_code == status
    if status == 502:
        assert f"the transfer broke after {arrive} of its 25 instances" in raised.value.detail
    assert not (tmp_path / "1.2.3").exists()  # nothing partial left for the next request to trust
