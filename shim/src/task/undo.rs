//! Cleanup steps for a create that fails halfway.

/// Steps recorded as a create goes, run newest first if it fails.
#[derive(Default)]
pub struct Undo(Vec<Box<dyn FnOnce() + Send>>);

impl Undo {
    pub fn push(&mut self, f: impl FnOnce() + Send + 'static) {
        self.0.push(Box::new(f));
    }

    pub fn run(&mut self) {
        while let Some(f) = self.0.pop() {
            f();
        }
    }

    /// The create succeeded: nothing is undone.
    pub fn forget(&mut self) {
        self.0.clear();
    }
}
