"""Text with images: image loading and checks, the preprocessor, image-caption data and its windows."""
