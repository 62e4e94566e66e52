"""Parts of the ONNX Runtime vision-language backend (models.vision_language)."""
