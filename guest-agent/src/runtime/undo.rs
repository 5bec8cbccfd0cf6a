//! Cleanup steps for a creation that fails halfway.

/// Runs the recorded undo steps (in reverse) when dropped, unless disarmed.
#[derive(Default)]
pub struct Undo(Vec<Box<dyn FnOnce() + Send>>);

impl Undo {
    pub fn push(&mut self, f: impl FnOnce() + Send + 'static) {
        self.0.push(Box::new(f));
    }

    /// The creation succeeded: nothing is undone.
    pub fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some(f) = self.0.pop() {
            f();
        }
    }
}
