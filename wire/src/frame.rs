//! Frames: placeholder replaced below.
