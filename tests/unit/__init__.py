"""Tests that need no mount, no daemon and no program besides the ones that build test images."""
