"""Fluoro2DRR: knee kinematics from single-plane fluoroscopy (3D Slicer scripted module).

This file is only the Slicer face (GUI, parameter node, self-test). All non-GUI work lives in
``Fluoro2DRRLib`` (``mrml_adapter`` for MRML conversion, ``registration`` for DiffDRR 2D/3D
registration, ``kinematics`` for Grood & Suntay), which CI tests without Slicer.
"""
import importlib.util
import logging
import os
from pathlib import Path
from typing import Annotated

import ctk  # noqa: F401 (Slicer's widgets are registered through it)
import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

TORCH_REQUIREMENT = "torch"
# diffdrr is installed with --no-deps (its declared torchvision / timm / pyvista pull a CUDA torch);
# these are the packages its used modules really import, plus ours.
PIP_REQUIREMENTS = ["einops", "fastcore", "pandas", "torchio", "nibabel", "scipy", "pillow", "pydicom"]
DIFFDRR_REQUIREMENT = "diffdrr==0.6.1"


#
# Fluoro2DRR
#
class Fluoro2DRR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Fluoro2DRR"
        self.parent.categories = ["Tracking"]
        self.parent.dependencies = []
        self.parent.contributors = ["Fluoro2DRR contributors"]
        self.parent.helpText = """
Measures knee kinematics from single-plane X-ray fluoroscopy. Inputs: the frames (a folder of images
or a volume sequence), the C-arm calibration (JointTrack JT_INTCALIB, Autoscoper mayaCam, DICOM or
Fluoro2DRR JSON) and femur / tibia models (models, segmentations or label maps; a CT optional).
Each frame is translated into a DRR-like image, then the bones are registered with DiffDRR. Results
are one transform sequence per bone, synchronised with the frames in a sequence browser, a quality
table, Grood &amp; Suntay knee angles and translations, and pose files (.csv, JointTrack .jts,
Autoscoper .tra).
"""
        self.parent.acknowledgementText = """
Method: "Automated 2D/3D Fluoroscopic Registration for Knee Joint Kinematics Using
Fluoroscopic-to-DRR Translation" (ISBI 2026), Laboratory for Movement Biomechanics, ETH Zurich.
Rendering and registration use DiffDRR (V. Gopalakrishnan and P. Golland, "Fast auto-differentiable
digitally reconstructed radiographs for solving inverse problems in intraoperative imaging", 2022).
"""


#
# Parameter node: the single source of GUI state
#
@parameterNodeWrapper
class Fluoro2DRRParameterNode:
    framesDirectory: Path
    framesSequence: slicer.vtkMRMLSequenceNode
    calibrationFile: Path
    calibrationNode: slicer.vtkMRMLTextNode
    femurNode: slicer.vtkMRMLDisplayableNode
    tibiaNode: slicer.vtkMRMLDisplayableNode
    ctVolume: slicer.vtkMRMLScalarVolumeNode
    side: Annotated[str, Choice(["right", "left"])] = "right"
    # "none" by default (DRR-like or already clean frames); choose "bundled" for raw fluoroscopy: on simulated
    # fluoroscopy it is what lets the automatic start work (README benchmarks, Resources/Models/MODEL_CARD.md),
    # but it was trained on simulated frames only
    # "model folder": a model written by `fluoro2drr train` (e.g. fine-tuned on your own paired frames)
    translation: Annotated[str, Choice(["none", "bundled", "model folder"])] = "none"
    translationModelDirectory: Path
    # > 1: also store the poses smoothed in time over this many frames ("Smoothed femur/tibia poses")
    smoothWindowFrames: Annotated[int, WithinRange(1, 31)] = 1
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    femurTransformSequence: slicer.vtkMRMLSequenceNode
    tibiaTransformSequence: slicer.vtkMRMLSequenceNode
    qualityTable: slicer.vtkMRMLTableNode
    femurLandmarks: slicer.vtkMRMLMarkupsFiducialNode
    tibiaLandmarks: slicer.vtkMRMLMarkupsFiducialNode
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    outputDirectory: Path


#
# Widget
#
class Fluoro2DRRWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobContext = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/Fluoro2DRR.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = Fluoro2DRRLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.loadInputsButton.connect("clicked(bool)", self.onLoadInputs)
        self.ui.runButton.connect("clicked(bool)", self.onRun)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.viewFromSourceButton.connect("clicked(bool)", self.onViewFromSource)
        self.ui.showFramePlaneButton.connect("clicked(bool)", self.onShowFramePlane)
        self.ui.showOutlinesButton.connect("clicked(bool)", self.onShowOutlines)
        self.ui.importPosesButton.connect("clicked(bool)", self.onImportPoses)
        self.ui.computeKinematicsButton.connect("clicked(bool)", self.onComputeKinematics)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.saveSceneButton.connect("clicked(bool)", self.onSaveScene)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._dropJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)

    def onSceneStartClose(self, caller, event) -> None:
        # The scene is going away: stop a running registration without storing it there.
        self._dropJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)
            self._checkCanRun()

    def _checkCanRun(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self._job is not None
        ready = bool(p and p.framesSequence and p.femurNode and p.tibiaNode
                     and (p.calibrationNode or str(p.calibrationFile or "") not in ("", ".")))
        self.ui.runButton.enabled = ready and not busy
        self.ui.runButton.toolTip = "Register every frame" if ready else \
            "Select frames (load them first), a calibration and femur / tibia models"
        hasResults = bool(p and p.femurTransformSequence and p.tibiaTransformSequence)
        self.ui.computeKinematicsButton.enabled = hasResults and not busy
        self.ui.exportButton.enabled = hasResults and not busy

    # ---- actions ------------------------------------------------------------------------------
    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to install dependencies.", waitCursor=True):
            ok = self.logic.ensureDependencies(askConfirmation=True)
            self.ui.statusLabel.text = "Dependencies ready." if ok else "Dependencies are missing."

    def onLoadInputs(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to load the inputs.", waitCursor=True):
            framesPath = str(p.framesDirectory or "")
            calibPath = str(p.calibrationFile or "")
            if framesPath in ("", ".") or calibPath in ("", "."):
                raise ValueError("Choose a frames folder/file and a calibration file first.")
            seq, browser, calibNodes = self.logic.loadInputs(framesPath, calibPath)
            p.framesSequence = seq
            p.calibrationNode = calibNodes["text"]
            if hasattr(slicer.modules, "sequences"):
                slicer.modules.sequences.setToolBarActiveBrowserNode(browser)
            self.ui.statusLabel.text = f"Loaded {seq.GetNumberOfDataNodes()} frames."

    def onRun(self) -> None:
        """Start a registration driven by a QTimer: one frame per tick, so the GUI stays responsive."""
        if self._job is not None:
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to start the registration.", waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                return
            calibration = p.calibrationNode if p.calibrationNode else str(p.calibrationFile)
            if p.smoothWindowFrames % 2 == 0:  # refused now, not after the whole registration
                raise ValueError(f"Smooth over frames must be odd (1 = off), not {p.smoothWindowFrames}.")
            if p.translation == "model folder" and str(p.translationModelDirectory) in ("", "."):
                raise ValueError("Choose the translation model folder (written by 'fluoro2drr train').")
            self._job, self._jobContext = self.logic.prepareJob(
                p.framesSequence, calibration, p.femurNode, p.tibiaNode,
                translation=str(p.translationModelDirectory) if p.translation == "model folder" else p.translation,
                device=p.device, ctNode=p.ctVolume)
        if self._job is None:
            return
        self.ui.progressBar.setMaximum(self._job.n_frames)
        self.ui.progressBar.setValue(0)
        self.ui.cancelButton.enabled = True
        self.ui.statusLabel.text = f"Registering {self._job.n_frames} frames..."
        self._checkCanRun()
        self._timer = qt.QTimer()
        self._timer.setSingleShot(False)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._onTimerStep)
        self._timer.start()

    def _onTimerStep(self) -> None:
        """One timer tick = one frame (the job keeps one Registrar: renderers are built once)."""
        job = self._job
        if job is None:
            self._stopTimer()
            return
        try:
            job.step()
        except Exception as exc:  # noqa: BLE001
            logging.exception("Fluoro2DRR registration failed")
            # Keep the finished frames; the failing frame and the rest are stored as failed.
            job.cancel()
            self._stopTimer()
            slicer.util.errorDisplay(f"Registration failed at frame {job.next_frame}: {exc}")
        self.ui.progressBar.setValue(job.next_frame)
        self.ui.statusLabel.text = ("Revisiting weak frames from their neighbours..." if job.revisiting
                                    else f"Registered {job.next_frame} / {job.n_frames} frames")
        if job.done:
            self._finishJob()

    def _finishJob(self) -> None:
        self._stopTimer()
        job, context = self._job, self._jobContext
        self._job, self._jobContext = None, None
        self.ui.cancelButton.enabled = False
        if job is None or job.next_frame == 0:
            self._checkCanRun()
            return
        femurSeq, tibiaSeq, quality = self.logic.finishJob(job, context,
                                                           smoothWindowFrames=self._parameterNode.smoothWindowFrames)
        p = self._parameterNode
        p.femurTransformSequence, p.tibiaTransformSequence, p.qualityTable = femurSeq, tibiaSeq, quality
        failed = len(job.failed_frames())
        self.ui.statusLabel.text = (f"Done: {job.next_frame} of {job.n_frames} frames registered, "
                                    f"{failed} failed or not run" + (" (cancelled)" if job.cancelled else ""))
        self._checkCanRun()

    def _stopTimer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _dropJob(self) -> None:
        """Stop and forget a running job without storing anything (scene closing, module destroyed)."""
        self._stopTimer()
        if self._job is not None:
            self._job.cancel()
        self._job, self._jobContext = None, None
        if hasattr(self, "ui"):
            self.ui.cancelButton.enabled = False

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()  # finished frames are kept; the next timer tick stores them
            self.ui.statusLabel.text = "Cancelling after the current frame..."
            if self._timer is None:
                self._finishJob()

    def onViewFromSource(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot place the camera.", waitCursor=True):
            self.logic.viewFromSource(self._geometry())

    def onShowFramePlane(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot show the frame in 3D.", waitCursor=True):
            self.logic.showFramePlane(p.framesSequence, self._geometry(), opacity=p.overlayOpacity)

    def onShowOutlines(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot draw the bone outlines.", waitCursor=True):
            self.logic.showBoneOutlines(p.framesSequence, p.femurTransformSequence, p.tibiaTransformSequence,
                                        p.femurNode, p.tibiaNode, self._geometry(), ctNode=p.ctVolume,
                                        opacity=p.overlayOpacity)

    def onImportPoses(self) -> None:
        """Pick .jts / .tra / .csv pose files (file names containing 'femur' / 'tibia')."""
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot import the pose files.", waitCursor=True):
            paths = qt.QFileDialog.getOpenFileNames(slicer.util.mainWindow(), "JointTrack / Autoscoper pose files",
                                                    "", "Pose files (*.jts *.tra *.csv)")
            if not paths:
                return
            byBone = {b: next((q for q in paths if b in os.path.basename(q).lower()), None) for b in ("femur", "tibia")}
            if not any(byBone.values()):
                raise ValueError("Name the files after the bone (e.g. femur.jts, tibia.jts).")
            space = "LPS" if slicer.util.confirmYesNoDisplay(
                "Do the poses refer to the model files as stored in LPS (Slicer's default for STL)?") else "RAS"
            seqs = self.logic.importPoseFiles(p.framesSequence, self._calibration(), byBone["femur"], byBone["tibia"],
                                              p.femurNode, p.tibiaNode, modelFileSpace=space)
            if "femur" in seqs:
                p.femurTransformSequence = seqs["femur"][0]
            if "tibia" in seqs:
                p.tibiaTransformSequence = seqs["tibia"][0]
            self.ui.statusLabel.text = f"Imported {', '.join(seqs)} poses"

    def onComputeKinematics(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to compute the kinematics.", waitCursor=True):
            femurSource = p.femurLandmarks if p.femurLandmarks else p.femurNode
            tibiaSource = p.tibiaLandmarks if p.tibiaLandmarks else p.tibiaNode
            self._kinematics = self.logic.computeKinematics(p.femurTransformSequence, p.tibiaTransformSequence,
                                                            femurSource, tibiaSource, side=p.side)
            self.onShowPlot()

    def onShowPlot(self) -> None:
        kin = getattr(self, "_kinematics", None)
        if kin:
            self.logic.showPlot(kin[2])

    def onExport(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to export the poses.", waitCursor=True):
            out = str(p.outputDirectory or "")
            if out in ("", "."):
                raise ValueError("Choose an output folder first.")
            written = self.logic.exportPoses(p.femurTransformSequence, p.tibiaTransformSequence, out,
                                             self._geometry(), kinematicsTable=(getattr(self, "_kinematics", None) or
                                                                                (None, None))[1])
            self.ui.statusLabel.text = f"Wrote {len(written)} files to {out}"

    def onSaveScene(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to save the scene.", waitCursor=True):
            out = str(p.outputDirectory or "")
            if out in ("", "."):
                raise ValueError("Choose an output folder first.")
            path = self.logic.saveScene(os.path.join(out, "Fluoro2DRR-session.mrb"))
            self.ui.statusLabel.text = f"Saved {path}"

    def _calibration(self):
        p = self._parameterNode
        return p.calibrationNode if p.calibrationNode else (
            str(p.calibrationFile) if str(p.calibrationFile or "") not in ("", ".") else None)

    def _geometry(self):
        return self.logic.geometry(self._calibration(), self._parameterNode.framesSequence)


#
# Logic
#
class Fluoro2DRRLogic(ScriptedLoadableModuleLogic):
    """Thin: every conversion and computation is in Fluoro2DRRLib (mrml_adapter, registration, kinematics)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return Fluoro2DRRParameterNode(super().getParameterNode())

    # ---- dependencies ------------------------------------------------------------------------
    @staticmethod
    def missingPackages() -> list:
        modules = {"torch": "torch", "diffdrr": "diffdrr", "einops": "einops", "fastcore": "fastcore",
                   "pandas": "pandas", "torchio": "torchio", "nibabel": "nibabel", "scipy": "scipy",
                   "PIL": "pillow", "pydicom": "pydicom"}
        return [pkg for mod, pkg in modules.items() if importlib.util.find_spec(mod) is None]

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what is missing: torch via PyTorchUtils when present, the rest with pip (asks first)."""
        missing = self.missingPackages()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                "Fluoro2DRR needs these Python packages, which will be downloaded and installed now:\n"
                + ", ".join(missing) + "\n(PyTorch alone can take several minutes and GB of disk.)",
                "Install dependencies"):
            return False
        if "torch" in missing:
            torchLogic = None
            if hasattr(slicer.modules, "pytorchutils"):
                import PyTorchUtils  # noqa: PLC0415

                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic is not None:
                if torchLogic.installTorch(askConfirmation=False) is None:
                    raise RuntimeError("PyTorch could not be installed (see the PyTorch Utils module).")
            else:
                slicer.util.pip_install(TORCH_REQUIREMENT)
        rest = [p for p in missing if p not in ("torch", "diffdrr")]
        if rest:
            if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
                try:
                    slicer.packaging.pip_ensure(rest)
                except TypeError:
                    slicer.util.pip_install(" ".join(rest))
            else:
                slicer.util.pip_install(" ".join(rest))
        if "diffdrr" in missing:
            slicer.util.pip_install(f"{DIFFDRR_REQUIREMENT} --no-deps")
        importlib.invalidate_caches()
        still = self.missingPackages()
        if still:
            raise RuntimeError("Still missing after installation: " + ", ".join(still))
        return True

    # ---- inputs ------------------------------------------------------------------------------
    def loadInputs(self, framesPath: str, calibrationPath: str, name: str = "Fluoroscopy"):
        """Frames file/folder + calibration file -> (frame sequence, browser, calibration nodes)."""
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        frames, _ = ma.frames_from_any(framesPath)
        geometry = ma.geometry_from_any(calibrationPath, image_size=(frames.shape[2], frames.shape[1]))
        seq, browser, proxy = ma.frames_to_volume_sequence(slicer.mrmlScene, frames, geometry, name)
        calibNodes = ma.calibration_to_nodes(slicer.mrmlScene, geometry)
        return seq, browser, calibNodes

    def geometry(self, calibration, framesSequence=None):
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        if calibration is None:
            geometry = ma.geometry_from_sequence(framesSequence) if framesSequence else None
            if geometry is None:
                raise ValueError("No calibration: load one with the frames.")
            return geometry
        size = None
        if framesSequence is not None and framesSequence.GetNumberOfDataNodes():
            dims = framesSequence.GetNthDataNode(0).GetImageData().GetDimensions()
            size = (dims[0], dims[1])
        return ma.geometry_from_any(calibration, image_size=size)

    # ---- registration ------------------------------------------------------------------------
    def prepareJob(self, framesSequence, calibration, femurNode, tibiaNode, translation="none", device="auto",
                   ctNode=None, settings=None, initPoses=None):
        """-> (SequenceRegistrationJob, context) for frame-by-frame (timer-driven) registration.

        ``translation``: "none", "bundled" or a model folder written by ``fluoro2drr train`` (a fine-tuned model).
        ``settings``: a ``Fluoro2DRRLib.registration.RegistrationSettings`` (default: the engine's).
        ``initPoses``: {"femur", "tibia"} -> world_from_bone (1, 4, 4) for the first frame (or (N, 4, 4));
        without it the first frame gets the automatic start. The job steps one frame at a time on one
        ``Registrar`` (tracking, lost-track recovery as in ``register_sequence``)."""
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        if framesSequence is None or femurNode is None or tibiaNode is None:
            raise ValueError("Frames, femur and tibia are required.")
        frames, _ = ma.frames_from_any(framesSequence)
        geometry = self.geometry(calibration, framesSequence)
        bones = ma.bones_from_nodes({"femur": femurNode, "tibia": tibiaNode}, ct_node=ctNode)
        job = ma.SequenceRegistrationJob(frames, geometry, bones, translation=translation, device=device,
                                         settings=settings, init_poses=initPoses)
        browser = ma.browser_for_sequence(slicer.mrmlScene, framesSequence)
        models = {name: node for name, node in (("femur", femurNode), ("tibia", tibiaNode))
                  if node.IsA("vtkMRMLModelNode")}
        return job, {"browser": browser, "models": models, "geometry": geometry}

    def finishJob(self, job, context, smoothWindowFrames: int = 1):
        """Store a (finished or cancelled) job -> (femur sequence, tibia sequence, quality table).

        ``smoothWindowFrames`` > 1 (odd): also store the poses smoothed in time as "Smoothed femur/tibia poses"
        sequences in the same browser (the measured sequences and the models' parenting are unchanged)."""
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        out = ma.store_registration_result(slicer.mrmlScene, job.poses, job.quality, context["browser"],
                                           models=context["models"], failed_frames=job.failed_frames())
        if smoothWindowFrames > 1:
            ma.store_smoothed_poses(slicer.mrmlScene, job.poses, job.bones, context["browser"], smoothWindowFrames,
                                    failed_frames=job.failed_frames())
        seqs = out["sequences"]
        return seqs["femur"][0], seqs["tibia"][0], out["quality"]

    def run(self, framesSequence, calibration, femurNode, tibiaNode, translation="none", device="auto",
            progress=None, ctNode=None, settings=None, initPoses=None, smoothWindowFrames=1):
        """Blocking registration of every frame -> (femur transform sequence, tibia transform sequence,
        quality table). ``progress(done, total)`` is called after each frame. Same job as the GUI's
        timer-driven run (one frame per step); failed frames are marked in the sequences and the table.
        ``translation``: "none", "bundled" or a model folder; ``smoothWindowFrames`` > 1: also store smoothed
        sequences (see :meth:`finishJob`)."""
        if int(smoothWindowFrames) < 1 or int(smoothWindowFrames) % 2 == 0:
            raise ValueError(f"smoothWindowFrames must be odd and >= 1 (1 = off), not {smoothWindowFrames}")
        job, context = self.prepareJob(framesSequence, calibration, femurNode, tibiaNode, translation, device,
                                       ctNode=ctNode, settings=settings, initPoses=initPoses)
        job.run(progress=progress)
        return self.finishJob(job, context, smoothWindowFrames)

    # ---- review ------------------------------------------------------------------------------
    def viewFromSource(self, geometry, viewIndex: int = 0) -> None:
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        viewNode = slicer.app.layoutManager().threeDWidget(viewIndex).mrmlViewNode()
        cameraNode = slicer.modules.cameras.logic().GetViewActiveCameraNode(viewNode)
        ma.camera_at_source(cameraNode, geometry)

    def showFramePlane(self, framesSequence, geometry, opacity: float = 0.6):
        """Textured detector plane showing the current frame in 3D (re-attached as the browser moves)."""
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        browser = ma.browser_for_sequence(slicer.mrmlScene, framesSequence)
        proxy = browser.GetProxyNode(framesSequence)
        planes = ma.nodes_by_role(slicer.mrmlScene, "frame_plane")
        plane = planes[0] if planes else ma.frame_plane_model(slicer.mrmlScene, geometry)
        plane.GetDisplayNode().SetOpacity(opacity)
        ma.attach_frame_texture(plane, proxy)
        return plane

    def showBoneOutlines(self, framesSequence, femurSequence, tibiaSequence, femurNode, tibiaNode, geometry,
                         ctNode=None, opacity: float = 1.0, progress=None):
        """The registered bones' silhouettes per frame as a volume sequence in the frames' browser, shown
        over the frame in the slice views (foreground). Failed frames show no outline."""
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        if None in (framesSequence, femurSequence, tibiaSequence, femurNode, tibiaNode):
            raise ValueError("Register first (or import poses): frames, both pose sequences and both bones are needed.")
        browser = ma.browser_for_sequence(slicer.mrmlScene, framesSequence)
        bones = ma.bones_from_nodes({"femur": femurNode, "tibia": tibiaNode}, ct_node=ctNode)
        poses = {"femur": ma.transform_sequence_to_poses(femurSequence),
                 "tibia": ma.transform_sequence_to_poses(tibiaSequence)}
        failed = set(ma.failed_frames_of_sequence(femurSequence)) | set(ma.failed_frames_of_sequence(tibiaSequence))
        seq, proxy = ma.bone_outline_sequence(slicer.mrmlScene, geometry, bones, poses, browser, failed_frames=failed,
                                              progress=progress)
        if hasattr(slicer.util, "setSliceViewerLayers") and proxy is not None:
            proxy.CreateDefaultDisplayNodes()
            proxy.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeLabels")
            proxy.GetDisplayNode().SetWindowLevelMinMax(0, 2)
            slicer.util.setSliceViewerLayers(background=browser.GetProxyNode(framesSequence), foreground=proxy,
                                             foregroundOpacity=opacity, fit=True)
        return seq

    def importPoseFiles(self, framesSequence, calibration, femurPath=None, tibiaPath=None, femurNode=None,
                        tibiaNode=None, modelFileSpace: str = "RAS"):
        """JointTrack ``.jts`` / Autoscoper ``.tra`` / ``poses.csv`` files -> transform sequences in the frames'
        browser; the bone nodes (models) are parented to them. ``modelFileSpace``: "LPS" when the poses refer to
        the model files as stored in LPS (Slicer's default for STL) -> {bone: (sequence, proxy)}."""
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415
        from Fluoro2DRRLib.geometry import RAS_FROM_LPS, rigid_inverse  # noqa: PLC0415

        if framesSequence is None:
            raise ValueError("Load the frames first: the poses are synchronised with them.")
        geometry = self.geometry(calibration, framesSequence)
        browser = ma.browser_for_sequence(slicer.mrmlScene, framesSequence)
        fileFromBone = rigid_inverse(RAS_FROM_LPS) if modelFileSpace.upper() == "LPS" else None
        files = {b: p for b, p in (("femur", femurPath), ("tibia", tibiaPath)) if p}
        seqs = ma.pose_files_to_transform_sequences(slicer.mrmlScene, files, browser, geometry,
                                                    file_from_bone={b: fileFromBone for b in files})
        models = {b: n for b, n in (("femur", femurNode), ("tibia", tibiaNode)) if n is not None and b in seqs}
        ma.parent_models_to_transforms(models, seqs)
        return seqs

    # ---- kinematics and export ---------------------------------------------------------------
    def computeKinematics(self, femurSequence, tibiaSequence, femurSource=None, tibiaSource=None, side="right"):
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        return ma.kinematics_from_sequences(slicer.mrmlScene, femurSequence, tibiaSequence,
                                            femurSource, tibiaSource, side=side)

    def showPlot(self, chartNode) -> None:
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotView)
        slicer.modules.plots.logic().ShowChartInLayout(chartNode)

    def exportPoses(self, femurSequence, tibiaSequence, directory, geometry=None, kinematicsTable=None) -> list:
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        written = ma.export_pose_files({"femur": femurSequence, "tibia": tibiaSequence}, directory, geometry)
        if kinematicsTable is not None:
            path = os.path.join(directory, "kinematics.csv")
            slicer.util.saveNode(kinematicsTable, path)
            written.append(path)
        return written

    def saveScene(self, path) -> str:
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415

        return str(ma.save_scene_mrb(slicer.mrmlScene, path))


#
# Test
#
def selfTestRegistrationSettings():
    """Small, fast registration settings for the self-test (same as Testing/Python/test_slicer_pipeline.py).

    So few finest-level evaluations never "settle": converged_similarity_gain=1 makes "converged" mean
    similarity >= min_similarity."""
    from Fluoro2DRRLib.registration import RegistrationSettings  # noqa: PLC0415

    return RegistrationSettings(detector_sizes=(32, 64, 128), voxel_mm=(3.0, 2.0, 1.2),
                                start_iterations=(30, 15, 6), track_iterations=(15, 10, 4),
                                converged_similarity_gain=1.0)


class Fluoro2DRRTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_Fluoro2DRR_scene_round_trip()
        self.setUp()
        self.test_Fluoro2DRR_pipeline()

    def test_Fluoro2DRR_scene_round_trip(self):
        import tempfile  # noqa: PLC0415

        import numpy as np  # noqa: PLC0415

        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415
        from Fluoro2DRRLib.geometry import knee_default_geometry  # noqa: PLC0415

        self.delayDisplay("Scene round trip")
        geometry = knee_default_geometry().resized(32)
        frames = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
        seq, browser, proxy = ma.frames_to_volume_sequence(slicer.mrmlScene, frames, geometry)
        poses = {"femur": np.stack([np.eye(4)] * 3), "tibia": np.stack([np.eye(4)] * 3)}
        ma.poses_to_transform_sequences(slicer.mrmlScene, poses, browser, failed_frames={1})
        with tempfile.TemporaryDirectory() as tmp:
            path = ma.save_scene_mrb(slicer.mrmlScene, os.path.join(tmp, "t.mrb"))
            self.assertTrue(path.is_file())
        self.assertEqual(browser.GetNumberOfItems(), 3)
        self.delayDisplay("Scene round trip passed")

    def test_Fluoro2DRR_pipeline(self):
        """Simulate 3 frames, register them with the logic (the job the GUI's timer drives), check accuracy."""
        self.delayDisplay("Whole pipeline on a simulated sequence")
        logic = Fluoro2DRRLogic()
        if logic.missingPackages():
            self.delayDisplay("Dependencies missing (" + ", ".join(logic.missingPackages()) + "): skipped")
            return
        import tempfile  # noqa: PLC0415

        import numpy as np  # noqa: PLC0415

        from Fluoro2DRRLib import bones as bones_mod  # noqa: PLC0415
        from Fluoro2DRRLib import mrml_adapter as ma  # noqa: PLC0415
        from Fluoro2DRRLib import pose_io, simulate  # noqa: PLC0415
        from Fluoro2DRRLib.evaluate import pose_errors  # noqa: PLC0415

        nFrames = 3
        sim = Path(tempfile.mkdtemp()) / "sim"
        simulate.simulate_sequence(sim, n_frames=nFrames, seed=3, image_size=128, progress=False,
                                   phantom_voxel_mm=1.0, max_flexion_deg=15)
        seq, browser, calibNodes = logic.loadInputs(str(sim / "frames"), str(sim / "calibration.json"))
        calib = calibNodes["text"]
        geometry = ma.geometry_from_node(calib)
        truth = pose_io.read_poses_csv(sim / "truth" / "poses.csv")
        polys = {b: bones_mod.read_mesh(sim / "models" / f"{b}.stl")[0] for b in ("femur", "tibia")}
        femur = ma.model_node_from_polydata(slicer.mrmlScene, polys["femur"], "femur")
        tibia = ma.model_node_from_polydata(slicer.mrmlScene, polys["tibia"], "tibia")
        done = []
        femurSeq, tibiaSeq, quality = logic.run(
            seq, calib, femur, tibia, translation="none", device="auto", progress=lambda d, n: done.append(d),
            settings=selfTestRegistrationSettings(), initPoses={b: truth[b][:1] for b in ("femur", "tibia")},
            smoothWindowFrames=3)
        self.assertEqual(femurSeq.GetNumberOfDataNodes(), nFrames)
        smoothed = slicer.util.getNode("Smoothed femur poses")
        self.assertTrue(browser.IsSynchronizedSequenceNode(smoothed, True))
        self.assertEqual(smoothed.GetNumberOfDataNodes(), nFrames)
        self.assertEqual(tibiaSeq.GetNumberOfDataNodes(), nFrames)
        self.assertEqual(quality.GetNumberOfRows(), nFrames)
        self.assertEqual(done[-1], nFrames)
        self.assertEqual(ma.failed_frames_of_sequence(femurSeq), [])
        self.assertTrue(browser.IsSynchronizedSequenceNode(femurSeq, True))
        est = ma.transform_sequence_to_poses(femurSeq)
        self.assertTrue(np.all(np.isfinite(est)))
        centroid = bones_mod.bone_from_polydata(polys["femur"], "femur", voxel_mm=1.2).centroid_mm
        err = pose_errors(est, truth["femur"], centroid, geometry)["in_plane_mm"]
        logging.info(f"Fluoro2DRR self-test femur in-plane errors (mm): {err}")
        self.assertTrue(np.all(err < 1.0), f"femur in-plane errors {err} mm")
        results, table, chart = logic.computeKinematics(femurSeq, tibiaSeq, femur, tibia)
        self.assertEqual(table.GetNumberOfRows(), nFrames)
        self.assertTrue(np.all(np.isfinite(results["flexion"])))
        outlines = logic.showBoneOutlines(seq, femurSeq, tibiaSeq, femur, tibia, geometry)
        self.assertEqual(outlines.GetNumberOfDataNodes(), nFrames)
        self.assertTrue(ma.array_from_volume(outlines.GetNthDataNode(0)).any())
        with tempfile.TemporaryDirectory() as tmp:
            written = logic.exportPoses(femurSeq, tibiaSeq, tmp, geometry)
            jts = {b: next(str(w) for w in written if str(w).endswith(f"{b}.jts")) for b in ("femur", "tibia")}
            imported = logic.importPoseFiles(seq, calib, jts["femur"], jts["tibia"])
            np.testing.assert_allclose(ma.transform_sequence_to_poses(imported["femur"][0]), est, atol=1e-6)
        self.delayDisplay("Pipeline test passed")
