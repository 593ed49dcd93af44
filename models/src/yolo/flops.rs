//! Size of the computation: floating-point operations of every convolution at a given input size
//! (2 per multiply-add, as Ultralytics' `get_flops` reports), and the number of convolutions.

use burn::nn::conv::{Conv2d, ConvTranspose2d};

use super::YoloV8;
use super::c2f::C2f;
use super::conv::Conv;
use super::head::Branch;

#[derive(Debug, Default, Clone, Copy)]
pub struct Cost {
    pub flops: f64,
    pub convolutions: usize,
}

impl Cost {
    fn conv2d(&mut self, conv: &Conv2d, (h, w): (usize, usize)) {
        let weights: usize = conv.weight.shape().dims::<4>().iter().product();
        self.flops += 2.0 * weights as f64 * (h * w) as f64;
        self.convolutions += 1;
    }

    fn conv(&mut self, conv: &Conv, out: (usize, usize)) {
        self.conv2d(&conv.conv, out);
    }

    fn c2f(&mut self, block: &C2f, out: (usize, usize)) {
        self.conv(&block.cv1, out);
        for bottleneck in &block.m {
            self.conv(&bottleneck.cv1, out);
            self.conv(&bottleneck.cv2, out);
        }
        self.conv(&block.cv2, out);
    }

    fn branch(&mut self, branch: &Branch, out: (usize, usize)) {
        self.conv(&branch.0, out);
        self.conv(&branch.1, out);
        self.conv2d(&branch.2, out);
    }

    fn conv_transpose(&mut self, conv: &ConvTranspose2d, (h_in, w_in): (usize, usize)) {
        let weights: usize = conv.weight.shape().dims::<4>().iter().product();
        self.flops += 2.0 * weights as f64 * (h_in * w_in) as f64;
        self.convolutions += 1;
    }
}

impl YoloV8 {
    /// Cost of one forward pass on a `height x width` image (multiples of 32).
    pub fn cost(&self, height: usize, width: usize) -> Cost {
        let at = |stride: usize| (height.div_ceil(stride), width.div_ceil(stride));
        let mut cost = Cost::default();
        cost.conv(&self.stem, at(2));
        cost.conv(&self.down_p2, at(4));
        cost.c2f(&self.c2f_p2, at(4));
        cost.conv(&self.down_p3, at(8));
        cost.c2f(&self.c2f_p3, at(8));
        cost.conv(&self.down_p4, at(16));
        cost.c2f(&self.c2f_p4, at(16));
        cost.conv(&self.down_p5, at(32));
        cost.c2f(&self.c2f_p5, at(32));
        cost.conv(&self.sppf.cv1, at(32));
        cost.conv(&self.sppf.cv2, at(32));
        cost.c2f(&self.top_down_p4, at(16));
        cost.c2f(&self.top_down_p3, at(8));
        cost.conv(&self.bottom_up_down_p3, at(16));
        cost.c2f(&self.bottom_up_p4, at(16));
        cost.conv(&self.bottom_up_down_p4, at(32));
        cost.c2f(&self.bottom_up_p5, at(32));
        let levels = [at(8), at(16), at(32)];
        let head = &self.head;
        for (i, &level) in levels.iter().enumerate() {
            cost.branch(&head.cv2[i], level);
            cost.branch(&head.cv3[i], level);
            if let Some(cv4) = head.cv4.get(i) {
                cost.branch(cv4, level);
            }
        }
        let anchors: usize = levels.iter().map(|(h, w)| h * w).sum();
        cost.conv2d(&head.dfl.conv, (anchors * 4, 1));
        if let Some(proto) = &head.proto {
            cost.conv(&proto.cv1, at(8));
            cost.conv_transpose(&proto.upsample, at(8));
            cost.conv(&proto.cv2, at(4));
            cost.conv(&proto.cv3, at(4));
        }
        cost
    }
}
