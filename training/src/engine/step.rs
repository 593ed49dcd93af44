//! What a train or validation step of any task reports to burn-train and to the epoch driver.

use burn::tensor::{Device, Tensor};
use burn::train::ItemLazy;
use burn::train::metric::{Adaptor, LossInput};

use crate::error::TrainError;

/// A step's loss (for burn-train's loss metric), its parts summed over the step's `count` items
/// (images or masks), and its failure: burn-train's steps cannot return errors, so a device that
/// fails in the middle of a step says so here and the driver stops on it.
#[derive(Debug)]
pub struct StepOutput<P> {
    pub loss: Tensor<1>,
    pub parts: P,
    pub count: usize,
    pub failure: Option<TrainError>,
}

impl<P> StepOutput<P> {
    pub fn new(loss: Tensor<1>, parts: P, count: usize) -> Self {
        Self { loss, parts, count, failure: None }
    }

    /// The output of a step that failed on `device`.
    pub fn failed(error: impl Into<TrainError>, device: &Device) -> Self
    where
        P: Default,
    {
        let loss = Tensor::zeros([1], &device.clone().without_autodiff());
        Self { loss, parts: P::default(), count: 0, failure: Some(error.into()) }
    }
}

impl<P> Adaptor<LossInput> for StepOutput<P> {
    fn adapt(&self) -> LossInput {
        LossInput::new(self.loss.clone())
    }
}

impl<P: Send> ItemLazy for StepOutput<P> {
    fn sync(self) -> Result<Self, burn::tensor::ExecutionError> {
        Ok(Self { loss: self.loss.without_autodiff(), ..self })
    }
}
