"""Fluoroscopy-to-DRR translation (two stages, after the ISBI 2026 method in the shared brief).

* ``networks`` -- stage 1 U-Net GAN generator + PatchGAN, stage 2 slim DRUNet / SRResNet / NAFNet.
* ``losses``   -- L1, SSIM, gradient, download-free perceptual, optional user LPIPS, segmentation, GAN.
* ``data``     -- simulated (frame, clean DRR target, bone mask) pairs; pluggable line-integral source.
* ``train``    -- ``train(config, out_dir, ...)``; ``inference`` -- ``Translator``;
  ``commands`` -- the ``fluoro2drr train`` / ``translate`` sub-commands.

The clean target / translation output is ``fluoro_sim.clean_drr_target``: exp(-summed bone line
integral / 30), bone dark on a white background.
"""
